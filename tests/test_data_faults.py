"""Data faults: corrupt images in labelled datasets, untrusted shards.json, truncated shards; progress and CLI
output; the batched training transforms that keep the loaders near the decode ceiling."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from pedlightning.data.datamodules import (
    AttributeDataModule,
    LUPersonDataModule,
    LUPersonTADataModule,
    ReIDDataModule,
    TextReIDDataModule,
)
from pedlightning.data.faults import ErrorCounter, ImageFaults, worker_message
from pedlightning.data.loading import ReportingLoader, pin_memory
from pedlightning.data.progress import progress
from pedlightning.data.shards import (
    MANIFEST,
    ShardStream,
    read_manifest,
    usable_shards,
    write_manifest,
)
from pedlightning.data.sources.luperson import find_shards
from pedlightning.data.synthetic import write_cuhk_pedes, write_luperson_shards, write_pa100k
from pedlightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_test_transform, build_train_transform
from pedlightning.data.transforms.batched import Deferred, collate_deferred, random_erase_box
from pedlightning.data.transforms.regions import RegionPairTransform
from pedlightning.errors import DatasetLayoutError

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = (32, 16)


def corrupt(path: str, data: bytes = b"not an image") -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture
def market(synthetic_market, tmp_path) -> str:
    """A private copy of the session's synthetic Market-1501 (16 train ids x 6 images), free to corrupt."""
    return shutil.copytree(synthetic_market, str(tmp_path / "market1501"))


def reid(root: str, **kw) -> ReIDDataModule:
    kw = {"img_size": SIZE, "batch_size": 8, "num_instances": 4, "num_workers": 0, "padding": 0,
          "erasing_prob": 0.0, **kw}
    data = ReIDDataModule(root=root, **kw)
    data.setup("fit")
    return data


def warnings_naming(caplog, path: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and path in r.getMessage()]


# ------------------------------------------------------------------------------------------------ labelled datasets
def test_reid_skip_keeps_pk_batches_and_names_the_file_once(market, caplog):
    data = reid(market)
    records = data.records("train")
    bad = corrupt(records[5].path)
    pid = records[5].pid
    loader = data.train_dataloader()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # two passes: the file is named once, counted once
            batches = list(loader)
    assert len(batches) == len(loader)
    for batch in batches:
        pids = batch["pid"].tolist()
        assert len(pids) == 8 and all(pids.count(p) == 4 for p in set(pids))  # still 2 identities x 4 images
        assert bad not in batch["path"]
    assert data.num_skipped == 1 and data.unreadable_images == [bad]
    assert len(warnings_naming(caplog, bad)) == 1
    reports = [r.getMessage() for r in caplog.records if "newly counted in this pass" in r.getMessage()]
    assert len(reports) == 1 and "1 unreadable sample(s) newly counted in this pass, 1 in total" in reports[0]
    # The replacement is the next image of the same identity (cyclic), read in its place.
    dataset = loader.dataset
    item = dataset[5]
    same_pid = [i for i, r in enumerate(records) if r.pid == pid]
    assert item["pid"] == pid and item["index"] == same_pid[(same_pid.index(5) + 1) % len(same_pid)] != 5


def test_reid_fail_raises_a_clean_error_from_a_worker(market):
    data = reid(market, on_error="fail", num_workers=1)
    records = data.records("train")
    bad = [corrupt(r.path) for r in records if r.pid == records[0].pid]  # every epoch samples each identity
    with pytest.raises(DatasetLayoutError) as info:
        list(data.train_dataloader())
    message = str(info.value)
    assert message.startswith("cannot read image ") and message.split()[3].rstrip(":") in bad
    assert "Traceback" not in message
    assert "on_error: skip" in message


def test_worker_skips_are_counted_across_workers(market):
    data = reid(market, num_workers=2)
    loader = data.train_dataloader()
    sampled = sorted({i for batch in loader.batch_sampler for i in batch})  # epoch 0, what both passes read
    bad = [corrupt(data.records("train")[sampled[i]].path) for i in (0, 10, 30)]
    for _ in range(2):
        n = sum(b["image"].shape[0] == 8 for b in loader)
        assert n == len(loader)
    assert data.faults("train").count == 3 and data.unreadable_images == sorted(bad)


def test_reid_eval_placeholder_keeps_the_gallery_aligned(market):
    data = reid(market)
    gallery = data.records("gallery")
    corrupt(gallery[2].path)
    dataset = data.dataset("gallery", lambda im: torch.tensor(im.size), "placeholder")
    item = dataset[2]
    assert item["index"] == 2 and item["pid"] == gallery[2].pid and item["image"].tolist() == [64, 128]
    assert dataset.faults.count == 1 and dataset.faults.bad_indices() == [2]


def test_verify_images_fails_naming_every_bad_file_or_drops_them(market, capsys):
    data = reid(market)
    bad_train = corrupt(data.records("train")[3].path)
    bad_gallery = corrupt(data.records("gallery")[1].path, b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(DatasetLayoutError) as info:
        reid(market, verify_images=True, on_error="fail")
    assert "2 unreadable image(s)" in str(info.value)
    assert bad_train in str(info.value) and bad_gallery in str(info.value)
    assert "checking that the" in capsys.readouterr().err  # progress start line
    strict_test = ReIDDataModule(root=market, img_size=SIZE, num_workers=0, verify_images=True, on_error="fail")
    with pytest.raises(DatasetLayoutError, match="1 unreadable"):  # the test stage checks query + gallery only
        strict_test.setup("test")
    kept = reid(market, verify_images=True, num_workers=2)
    err = capsys.readouterr().err
    assert "train: 1 unreadable image(s) dropped, 95 kept" in err and "gallery: 1 unreadable" in err
    assert [p for p, _ in kept.dropped] == sorted([bad_train, bad_gallery]) and kept.num_skipped == 2
    assert len(kept.records("train")) == 95 and kept.num_classes == 16  # class indices unchanged
    gallery_items = kept.data_spec().eval_items["test"][1]
    assert bad_gallery not in gallery_items and len(gallery_items) == len(kept.records("gallery"))
    batch = next(iter(kept.train_dataloader()))
    assert batch["image"].shape == (8, 3, *SIZE)


def test_attribute_substitute_brings_its_own_labels(tmp_path):
    root = write_pa100k(str(tmp_path / "pa"), size=(64, 32), num_train=24, num_val=8, num_test=8)
    data = AttributeDataModule(root=root, img_size=SIZE, batch_size=4, num_workers=0)
    data.setup("fit")
    records = data.records("train")
    corrupt(records[0].path)
    dataset = data.dataset("train", None, "substitute")
    item = dataset[0]
    assert item["index"] == 1 and item["path"] == records[1].path
    assert item["labels"].tolist() == list(records[1].labels)
    assert all(b["labels"].shape == (4, 26) for b in data.train_dataloader())
    assert data.num_skipped == 1


def test_text_pairs_are_replaced_by_another_image_of_the_identity(tmp_path):
    root = write_cuhk_pedes(str(tmp_path / "cuhk"), size=(64, 32), num_train_ids=4, num_val_ids=2, num_test_ids=2)
    data = TextReIDDataModule("cuhk_pedes", root, img_size=SIZE, tokenizer="clip_tiny_test", context_length=16,
                              batch_size=4, num_instances=2, num_workers=0, padding=0, erasing_prob=0.0)
    data.setup("fit")
    records = data.records("train")
    bad = corrupt(records[0].path)
    loader = data.train_dataloader()
    dataset = loader.dataset
    item = dataset[0]  # caption 0 belongs to image 0
    assert item["pid"] == records[0].pid and item["path"] != bad
    assert dataset.captions[item["index"]] in records[item["image_index"]].captions  # caption matches its image
    for batch in loader:
        pids = batch["pid"].tolist()
        assert len(pids) == 4 and all(pids.count(p) == 2 for p in set(pids)) and bad not in batch["path"]
    assert data.unreadable_images == [bad]


def test_image_faults_is_shared_and_dedupes(caplog):
    faults = ImageFaults(3, "skip")
    with caplog.at_level(logging.WARNING):
        faults.record_file(1, "/x/b.jpg", "broken")
        faults.record_file(1, "/x/b.jpg", "broken")
    assert faults.count == 1 and faults.bad_indices() == [1] and faults.is_bad(1) and not faults.is_bad(0)
    assert len(warnings_naming(caplog, "/x/b.jpg")) == 1
    with pytest.raises(DatasetLayoutError, match="cannot read image /x/c.jpg: broken"):
        ImageFaults(3, "fail").record_file(2, "/x/c.jpg", "broken")


class _Raises(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        raise DatasetLayoutError("cannot read image /data/x.jpg: truncated\n(set on_error: skip ...)")


def test_worker_errors_keep_their_message():
    with pytest.raises(DatasetLayoutError) as info:
        list(ReportingLoader(_Raises(), batch_size=2, num_workers=1))
    assert str(info.value) == "cannot read image /data/x.jpg: truncated\n(set on_error: skip ...)"
    plain = DatasetLayoutError("no worker involved")
    assert worker_message(plain) == "no worker involved"


def test_pin_memory_only_on_a_cuda_trainer(market):
    import lightning as L

    assert pin_memory(None) is False
    assert pin_memory(L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)) is False
    data = reid(market)
    assert data.train_dataloader().pin_memory is False and data.val_dataloader().pin_memory is False


# ------------------------------------------------------------------------------------------------ shards
@pytest.fixture
def shards(tmp_path) -> str:
    """12 images in shards of 4, with the manifest the writer makes."""
    return write_luperson_shards(str(tmp_path / "shards"), num_images=12, shard_size=4, size=SIZE)


def key_only(image):
    return {"size": torch.tensor(image.size)}


def edit_manifest(root: str, change) -> str:
    path = os.path.join(root, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    change(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)
    return path


def test_malformed_manifest_errors_name_the_file(shards):
    path = os.path.join(shards, MANIFEST)
    with open(path, "w") as f:
        f.write('{"shards": [')
    with pytest.raises(DatasetLayoutError, match=f"shard manifest {path}: not readable JSON"):
        usable_shards(find_shards(shards))
    with open(path, "w") as f:
        json.dump({"shards": [{"name": "shard-000000.tar", "num_samples": "4"}]}, f)
    with pytest.raises(DatasetLayoutError, match=r"shards\[0\] must be"):
        read_manifest(shards)
    with open(path, "w") as f:
        json.dump({"shards": [{"name": "shard-000000.tar", "num_samples": 4}], "num_samples": 12}, f)
    with pytest.raises(DatasetLayoutError, match="num_samples says 12 but its shards add up to 4"):
        read_manifest(shards)
    data = LUPersonDataModule(root=shards, img_size=SIZE, batch_size=4, num_workers=0)
    with pytest.raises(DatasetLayoutError, match=path):
        data.setup("fit")


def test_wrong_declared_count_is_caught_when_the_shard_is_read(shards):
    def inflate(manifest):
        manifest["shards"][1]["num_samples"] = 9
        manifest["num_samples"] = 17

    edit_manifest(shards, inflate)
    found = find_shards(shards)
    kept, sizes = usable_shards(found)
    assert sizes == [4, 9, 4]  # the size check passes (bytes unchanged); counts are checked on reading
    errors = ErrorCounter("skip")
    samples = list(ShardStream(kept, key_only, shuffle_buffer=1, errors=errors, num_samples=sizes))
    assert len(samples) == 12 and errors.count == 1
    with pytest.raises(DatasetLayoutError, match=f"shard {found[1]}: holds 4 images but 9 were planned"):
        list(ShardStream(kept, key_only, shuffle_buffer=1, errors=ErrorCounter("fail"), num_samples=sizes))


def truncate(path: str, keep: int) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:keep])


def test_truncated_shard_is_skipped_under_skip_and_named_under_fail(shards, capsys):
    found = find_shards(shards)
    truncate(found[1], os.path.getsize(found[1]) // 2)
    errors = ErrorCounter("skip")
    kept, sizes = usable_shards(found, errors)
    assert kept == [found[0], found[2]] and sizes == [4, 4] and errors.count == 1
    with pytest.raises(DatasetLayoutError, match=f"shard {found[1]}: .* bytes, but .*shards.json records"):
        usable_shards(found, ErrorCounter("fail"))
    data = LUPersonDataModule(root=shards, img_size=SIZE, batch_size=4, num_workers=0)
    data.setup("fit")  # does not abort
    assert data.shards == kept and data.num_skipped == 1 and len(data.train_dataloader()) == 2
    os.remove(os.path.join(shards, MANIFEST))  # no manifest: the headers are counted, a cut header is an error
    os.remove(found[1])
    truncate(found[2], 700)
    errors = ErrorCounter("skip")
    kept, sizes = usable_shards(find_shards(shards), errors)
    assert kept == [found[0]] and sizes == [4] and errors.count == 1
    strict = LUPersonDataModule(root=shards, img_size=SIZE, batch_size=4, num_workers=0, on_error="fail")
    with pytest.raises(DatasetLayoutError, match=f"shard {found[2]}"):
        strict.setup("fit")


def test_missing_listed_shard_is_counted(shards):
    found = find_shards(shards)
    os.remove(found[2])
    errors = ErrorCounter("skip")
    kept, sizes = usable_shards(find_shards(shards), errors)
    assert kept == found[:2] and errors.count == 1
    with pytest.raises(DatasetLayoutError, match=f"shard {found[2]}: listed in .*shards.json but missing"):
        usable_shards(find_shards(shards))


def test_truncated_luperson_ta_shard_does_not_abort_setup(tmp_path):
    root = write_luperson_shards(str(tmp_path / "ta"), num_images=12, shard_size=4, size=SIZE, with_text=True)
    os.remove(os.path.join(root, MANIFEST))
    truncate(find_shards(root)[0], 700)
    data = LUPersonTADataModule(root, img_size=SIZE, tokenizer="clip_tiny_test", context_length=16, batch_size=4,
                                num_workers=0)
    data.setup("fit")
    assert len(data.shards) == 2 and data.num_skipped == 1 and data.stats.num_samples == 8


def test_write_manifest_records_sizes(tmp_path):
    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("k.jpg")
        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, format="JPEG")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    write_manifest(str(tmp_path), [str(shard)], [1])
    assert read_manifest(str(tmp_path)) == {"a.tar": {"num_samples": 1, "bytes": os.path.getsize(shard)}}


# ------------------------------------------------------------------------------------------------ progress and CLIs
def test_progress_is_silent_off_a_terminal(capsys, monkeypatch):
    assert list(progress(range(5), 5, "x")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert list(progress(range(5), 5, "bar")) == [0, 1, 2, 3, 4]
    assert "bar" in capsys.readouterr().err


def test_synth_announces_before_writing_and_names_its_prog(tmp_path, capsys):
    from pedlightning.cli import main

    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert capsys.readouterr().out.startswith("usage: pedlightning synth")
    with pytest.raises(SystemExit):
        main(["make-shards", "--help"])
    assert capsys.readouterr().out.startswith("usage: pedlightning make-shards")
    root = str(tmp_path / "lup")
    main(["synth", "luperson", "--root", root, "--num-images", "6", "--size", "32", "16"])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0] == f"writing synthetic luperson to {root}" and lines[-1].startswith("wrote synthetic luperson")
    assert captured.out.strip() == root
    main(["make-shards", root, str(tmp_path / "s"), "--shard-size", "4"])
    captured = capsys.readouterr()
    assert captured.err.startswith(f"packing 6 images from {root} into shards of 4")
    assert "wrote 6 images into 2 shards" in captured.out


# ------------------------------------------------------------------------------------------------ batched transforms
LEVEL = 1 / (255 * min(IMAGENET_STD))  # one intensity level after normalisation (the largest channel step)


def _photo(height: int = 128, width: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


def test_reid_train_transform_matches_torchvision_pad_crop_flip():
    """The batched pipeline gives the pixels of Resize -> flip -> Pad(10) -> RandomCrop -> ToTensor -> Normalize
    (up to one intensity level: torchvision's uint8 resize rounds a few pixels unlike PIL's when shrinking)."""
    image = _photo()
    transform = build_train_transform((64, 32), flip_prob=0.5, padding=10, erasing_prob=0.0)
    random.seed(0)
    seen = set()
    for _ in range(30):
        prepared = transform.prepare(image)
        dy, dx = prepared.shift
        resized = image.resize((32, 64), Image.BICUBIC)
        candidates = []
        for flip in (False, True):
            source = TF.hflip(resized) if flip else resized
            reference = TF.normalize(TF.to_tensor(TF.crop(TF.pad(source, 10), 10 + dy, 10 + dx, 64, 32)),
                                     IMAGENET_MEAN, IMAGENET_STD)
            candidates.append((transform.finish([prepared])[0] - reference).abs().max().item())
        assert min(candidates) <= 1.01 * LEVEL
        seen.add((candidates.index(min(candidates)), dy != 0 or dx != 0))
    assert {f for f, _ in seen} == {0, 1} and any(s for _, s in seen)  # both flips and real shifts were drawn


def test_random_erasing_region_and_noise():
    transform = build_train_transform((64, 32), flip_prob=0.0, padding=0, erasing_prob=1.0)
    plain = build_train_transform((64, 32), flip_prob=0.0, padding=0, erasing_prob=0.0)
    image = _photo()
    reference = plain(image)
    random.seed(1)
    noise = []
    for _ in range(40):
        prepared = transform.prepare(image)
        top, left, h, w = prepared.erase
        assert 0.02 * 64 * 32 * 0.8 <= h * w <= 0.33 * 64 * 32 * 1.2 and 0.3 * 0.7 <= h / w <= 3.3 * 1.3
        out = transform.finish([prepared])[0]
        inside = torch.zeros(64, 32, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert torch.allclose(out[:, ~inside], reference[:, ~inside], atol=1e-5)
        noise.append(out[:, inside].flatten())
    noise = torch.cat(noise)
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
    assert random_erase_box(10, 10, scale=(0.99, 1.0), ratio=(1.0, 1.0)) is None  # no 10 x 10 region fits inside


def test_deferred_batches_from_a_worker_equal_the_per_image_pipeline(market):
    """Without augmentation the training transform is resize + normalise: the test transform's pixels (PIL's
    resize there, torchvision's uint8 resize here: within one intensity level)."""
    data = reid(market, flip_prob=0.0, padding=0, erasing_prob=0.0, num_workers=1)
    batch = next(iter(data.train_dataloader()))
    test = build_test_transform(SIZE)
    expected = torch.stack([test(Image.open(p).convert("RGB")) for p in batch["path"]])
    assert batch["image"].shape == (8, 3, *SIZE) and batch["image"].dtype == torch.float32
    difference = (batch["image"] - expected).abs()
    assert difference.max() <= 1.01 * LEVEL and difference.mean() < 0.05 * LEVEL
    deferred = data.train_dataloader().dataset[0]["image"]
    assert isinstance(deferred, Deferred) and collate_deferred([{"image": deferred}])["image"].shape == (1, 3, *SIZE)


def test_region_pairs_deferred_equal_immediate_and_flip_mirrors_the_box():
    image = _photo(150, 70)
    immediate = RegionPairTransform((64, 32), flip_prob=1.0, rng=random.Random(0))
    deferred = RegionPairTransform((64, 32), flip_prob=1.0, rng=random.Random(0), defer=True)
    a, b = immediate(image), collate_deferred([deferred(image)])
    torch.testing.assert_close(b["region_a"][0], a["region_a"])
    torch.testing.assert_close(b["box_b"][0], a["box_b"])
    top, left, h, w = (a["box_a"] * torch.tensor([150, 70, 150, 70])).round().int().tolist()
    flipped = TF.hflip(image)  # boxes are in the frame of the flipped image
    reference = TF.normalize(TF.to_tensor(TF.resized_crop(flipped, top, left, h, w, [64, 32],
                                                          TF.InterpolationMode.BICUBIC, antialias=True)),
                             IMAGENET_MEAN, IMAGENET_STD)
    assert (a["region_a"] - reference).abs().max() <= 1.01 * LEVEL
    assert (a["region_a"] - reference).abs().mean() < 0.3 * LEVEL  # pixel noise: the worst case for rounding


def test_cli_run_over_a_corrupt_image_exits_2_naming_it(market, tmp_path, capsys):
    """``on_error: fail`` through the pedlightning command: one error line that names the file, exit status 2."""
    from pedlightning.cli import main

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = reid(market)
    records = data.records("train")
    bad = {corrupt(r.path) for r in records if r.pid == records[0].pid}  # sampled in every epoch
    argv = ["fit", "--config", os.path.join(repo, "configs/demo/reid_market_synthetic.yaml"), "--config",
            os.path.join(repo, "tests/support/tiny_reid.yaml"), f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--data.init_args.root={market}", "--data.init_args.on_error=fail", "--data.init_args.num_workers=1",
            "--trainer.max_epochs=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and err.count("pedlightning: error:") == 1
    line = next(x for x in err.splitlines() if x.startswith("pedlightning: error:"))
    assert line.startswith("pedlightning: error: cannot read image ") and line.split()[5].rstrip(":") in bad
