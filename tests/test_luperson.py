"""LUPerson data: folder / list parsing, shard writing, shard streaming (also under 2-process DDP), the DataModule."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

from pedlightning.data.datamodules.luperson import LUPersonDataModule
from pedlightning.data.shards import (
    EpochLoader,
    ErrorCounter,
    ShardStream,
    batches_per_rank,
    count_samples,
    sample_key,
    shard_sizes,
    write_shards,
)
from pedlightning.data.sources.luperson import (
    detect_kind,
    find_shards,
    luperson_images,
    read_image_list,
)
from pedlightning.data.synthetic import write_luperson_folder, write_luperson_shards
from pedlightning.errors import ConfigError, DatasetLayoutError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def key_only(image):
    """A transform that keeps the stream cheap: only the image size."""
    return {"size": torch.tensor(image.size)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lup") / "images")
    write_luperson_folder(root, num_images=40, num_videos=4, size=(32, 16))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """36 images in shards of 8: sizes 8, 8, 8, 8, 4 (with the writer's shards.json)."""
    root = str(tmp_path_factory.mktemp("lup") / "shards")
    write_luperson_shards(root, num_images=36, shard_size=8, size=(32, 16))
    return root


# ------------------------------------------------------------------------------------------------ sources
def test_folder_scan_is_recursive_sorted_and_skips_hidden(folder, tmp_path):
    paths = luperson_images(folder)
    assert len(paths) == 40 and paths == sorted(paths) and all(os.path.isabs(p) for p in paths)
    assert {os.path.basename(os.path.dirname(p)) for p in paths} == {"v00000", "v00001", "v00002", "v00003"}
    tree = tmp_path / "tree"
    (tree / "a" / ".cache").mkdir(parents=True)
    (tree / "a" / "x.JPG").write_bytes(b"")
    (tree / "a" / ".cache" / "y.jpg").write_bytes(b"")
    (tree / "notes.txt").write_text("")
    assert luperson_images(str(tree)) == [str(tree / "a" / "x.JPG")]
    assert detect_kind(str(tree)) == "folder"


def test_image_list_relative_paths_comments_and_errors(folder, tmp_path):
    rel = [os.path.relpath(p, folder) for p in luperson_images(folder)[:3]]
    listing = tmp_path / "list.txt"
    listing.write_text("# LUPerson subset\n\n" + "\n".join(rel) + "\n")
    assert read_image_list(str(listing), image_root=folder) == [os.path.join(folder, r) for r in rel]
    assert detect_kind(str(listing)) == "list"
    with pytest.raises(DatasetLayoutError, match="3 referenced image"):
        read_image_list(str(listing))  # relative to the list's own folder, where they do not exist
    listing.write_text(rel[0] + "\nlabels.csv\n")
    with pytest.raises(DatasetLayoutError, match=r"line 2: 'labels.csv' is not an image path"):
        read_image_list(str(listing), image_root=folder)


def test_missing_and_empty_roots_name_the_path(tmp_path):
    with pytest.raises(DatasetLayoutError, match=f"{tmp_path / 'nope'} does not exist"):
        luperson_images(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="no image .* found under") as info:
        luperson_images(str(tmp_path / "empty"))
    assert "Expected layout" in str(info.value)
    with pytest.raises(DatasetLayoutError, match="no .tar file"):
        find_shards(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------------ writing shards
def test_write_shards_roundtrip_keys_and_manifest(folder, tmp_path):
    paths = luperson_images(folder)
    out = tmp_path / "out"
    summary = write_shards(paths, str(out), shard_size=16, root=folder)
    assert summary.num_samples == [16, 16, 8] and summary.skipped == []
    manifest = json.loads((out / "shards.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [16, 16, 8] and manifest["num_samples"] == 40
    assert [count_samples(s) for s in summary.shards] == [16, 16, 8]
    originals = {}
    for i, p in enumerate(paths):
        with open(p, "rb") as f:
            originals[sample_key(p, folder, i)] = f.read()
    stored = {}
    for shard in summary.shards:
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                assert ext == "jpg"
                stored[key] = tar.extractfile(m).read()
    assert stored == originals  # original bytes, keys without dots, nothing lost
    assert sample_key("/d/v1/a.b.jpg", "/d", 7) == "000000007_v1_a_b"


def test_write_shards_skips_or_fails_on_corrupt_images(folder, tmp_path):
    paths = luperson_images(folder)[:10]
    bad = tmp_path / "bad.jpg"
    with open(paths[0], "rb") as f:
        bad.write_bytes(f.read()[:200])  # a truncated JPEG: Image.open succeeds, decoding fails
    summary = write_shards([*paths[:5], str(bad), *paths[5:]], str(tmp_path / "skip"), shard_size=4)
    assert summary.num_samples == [4, 4, 2] and [p for p, _ in summary.skipped] == [str(bad)]
    assert json.loads((tmp_path / "skip" / "shards.json").read_text())["skipped"][0]["path"] == str(bad)
    with pytest.raises(DatasetLayoutError, match=f"image {bad}"):
        write_shards([*paths, str(bad)], str(tmp_path / "fail"), shard_size=4, on_error="fail")
    assert sorted(os.listdir(tmp_path)) == ["bad.jpg", "skip"]  # the failed conversion left nothing behind
    with pytest.raises(ConfigError, match="not an empty folder"):
        write_shards(paths, str(tmp_path / "skip"))


def test_make_shards_command(folder, tmp_path):
    from pedlightning.tools.make_shards import main

    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(luperson_images(folder)[:12]))
    main([str(listing), str(tmp_path / "s"), "--shard-size", "5", "--num-workers", "2"])
    assert shard_sizes(find_shards(str(tmp_path / "s"))) == [5, 5, 2]


# ------------------------------------------------------------------------------------------------ streaming
def test_batches_per_rank_by_hand():
    sizes = [8, 8, 8, 8, 4]
    # 2 ranks: each holds >= 2 shards, at worst the two smallest (4 + 8 = 12 samples) -> 3 batches of 4
    assert batches_per_rank(sizes, 2, 4) == 3
    assert batches_per_rank(sizes, 1, 4) == 9
    assert batches_per_rank(sizes, 3, 4) == 1  # one shard per rank at worst: the 4-sample one
    assert batches_per_rank(sizes, 2, 4, "resampled") == 36 // 8
    assert batches_per_rank(sizes, 2, 4, "resampled", samples_per_epoch=80) == 10
    with pytest.raises(ConfigError, match="5 shard"):
        batches_per_rank(sizes, 6, 4)
    with pytest.raises(ConfigError, match="no full batch"):
        batches_per_rank(sizes, 2, 16)


def _epoch_keys(shards, rank, world, epoch, num_workers=2, mode="split", batch_size=4, errors=None):
    stream = ShardStream(find_shards(shards), key_only, mode, shuffle_buffer=4, seed=1, rank=rank,
                         world_size=world, errors=errors)
    n = batches_per_rank(shard_sizes(stream.shards), world, batch_size, mode)
    loader = EpochLoader(DataLoader(stream, batch_size=batch_size, num_workers=num_workers), n)
    loader.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
    batches = list(loader)
    return [k for b in batches for k in b["key"]], len(batches)


def test_split_streams_of_two_ranks_are_disjoint_and_equally_long(shards):
    for epoch in (0, 1):
        keys0, n0 = _epoch_keys(shards, 0, 2, epoch)
        keys1, n1 = _epoch_keys(shards, 1, 2, epoch)
        assert n0 == n1 == 3
        assert len(set(keys0)) == len(keys0) and len(set(keys1)) == len(keys1)
        assert not set(keys0) & set(keys1)
    assert _epoch_keys(shards, 0, 2, 0) == _epoch_keys(shards, 0, 2, 0)  # seeded
    assert _epoch_keys(shards, 0, 2, 0)[0] != _epoch_keys(shards, 0, 2, 1)[0]  # new order each epoch
    keys, n = _epoch_keys(shards, 0, 1, 0, num_workers=0)
    assert n == 9 and len(set(keys)) == 36  # one process reads every sample once


def test_persistent_workers_follow_the_epoch(shards):
    stream = ShardStream(find_shards(shards), key_only, shuffle_buffer=4, seed=1)
    loader = EpochLoader(DataLoader(stream, batch_size=4, num_workers=2, persistent_workers=True), 9)
    orders = []
    for epoch in (0, 1, 0):
        loader.sampler.set_epoch(epoch)
        orders.append([k for batch in loader for k in batch["key"]])
    assert all(len(set(keys)) == len(keys) == 36 for keys in orders)
    assert orders[0] == orders[2] != orders[1]


def test_resampled_stream_gives_the_requested_epoch(shards):
    keys, n = _epoch_keys(shards, 1, 2, 0, mode="resampled")
    assert n == 4 and len(keys) == 16


def _shard_with_bad_sample(root, good_shard):
    os.makedirs(root)
    with tarfile.open(good_shard) as src, tarfile.open(os.path.join(root, "shard-000000.tar"), "w") as dst:
        members = [m for m in src if m.isfile()]
        for i, m in enumerate(members):
            data = src.extractfile(m).read()
            if i == 2:
                data = data[:100]
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return members[2].name


def test_corrupt_shard_samples_are_counted_or_fail_with_their_key(shards, tmp_path):
    bad_name = _shard_with_bad_sample(str(tmp_path / "bad"), find_shards(shards)[0])
    errors = ErrorCounter("skip")
    stream = ShardStream(find_shards(str(tmp_path / "bad")), key_only, shuffle_buffer=1, errors=errors)
    assert len(list(stream)) == 7 and errors.count == 1
    errors = ErrorCounter("skip")
    keys, n = _epoch_keys(str(tmp_path / "bad"), 0, 1, 0, num_workers=2, batch_size=4, errors=errors)
    assert errors.count == 1  # counted inside a loader worker, visible here
    assert n == 2 and len(set(keys)) == len(keys) == 7  # 8 samples planned, 7 readable: a partial batch
    keys, n = _epoch_keys(str(tmp_path / "bad"), 0, 1, 0, num_workers=2, batch_size=1)
    assert n == 8 and len(keys) == 8 and len(set(keys)) == 7  # 7 batches, then a second pass fills the 8th
    with pytest.raises(DatasetLayoutError, match=bad_name):
        list(ShardStream(find_shards(str(tmp_path / "bad")), key_only, errors=ErrorCounter("fail")))


def test_equal_batches_and_no_duplicates_under_two_process_ddp(shards, tmp_path):
    """Two gloo processes (ddp_spawn in a subprocess), two epochs.

    Loader workers of spawned processes are spawned too (each re-imports torch, ~30 s on a loaded 2-core
    machine), so the processes read in-process here; worker splitting is covered by the test above.
    """
    script = tmp_path / "ddp_keys.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import lightning as L, torch
        from pedlightning.data.datamodules.luperson import LUPersonDataModule

        class KeyRecorder(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(1))
                self.seen = {{}}

            def training_step(self, batch, batch_idx):
                self.seen.setdefault(self.current_epoch, []).append(list(batch["key"]))
                return (self.w * batch["region_a"].mean()).sum()

            def on_train_end(self):
                with open(f"{tmp_path}/rank{{self.global_rank}}.json", "w") as f:
                    json.dump(self.seen, f)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        if __name__ == "__main__":
            dm = LUPersonDataModule(root="{shards}", img_size=(32, 16), batch_size=4, num_workers=0,
                                    shuffle_buffer=4)
            trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=2, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False)
            trainer.fit(KeyRecorder(), dm)
    """))
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        batches = [seen[r][epoch] for r in (0, 1)]
        assert len(batches[0]) == len(batches[1]) == batches_per_rank([8, 8, 8, 8, 4], 2, 4) == 3
        keys = [k for r in (0, 1) for b in batches[r] for k in b]
        assert len(keys) == len(set(keys))  # no sample twice in an epoch, within or across ranks
    assert seen[0]["0"] != seen[0]["1"]


# ------------------------------------------------------------------------------------------------ the DataModule
def test_datamodule_folder_batches_and_skips_unreadable_images(tmp_path):
    root = str(tmp_path / "lup")
    dm = LUPersonDataModule(root=root, synthesize=True, synthetic={"num_images": 10, "size": [32, 16]},
                            img_size=(32, 16), batch_size=5, num_workers=0)
    dm.prepare_data()
    paths = luperson_images(root)
    assert len(paths) == 10
    with open(paths[4], "wb") as f:
        f.write(b"not a jpeg")
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.num_batches == 2
    assert sorted(len(b["index"]) for b in batches) == [4, 5]  # the unreadable image is left out of its batch
    assert sorted(i for b in batches for i in b["index"].tolist()) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert dm.num_skipped == 1
    assert batches[0]["region_a"].shape[1:] == (3, 32, 16) and batches[0]["box_b"].shape[1:] == (4,)
    strict = LUPersonDataModule(root=root, img_size=(32, 16), batch_size=5, num_workers=0, on_error="fail")
    strict.setup("fit")
    with pytest.raises(DatasetLayoutError, match=paths[4]):
        list(strict.train_dataloader())


def test_datamodule_shards_with_synthesis_and_missing_root(tmp_path):
    dm = LUPersonDataModule(root=str(tmp_path / "s"), source="shards", synthesize=True,
                            synthetic={"num_images": 12, "shard_size": 4, "size": [32, 16]}, img_size=(32, 16),
                            batch_size=4, num_workers=0, same_region=True)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 3
    batch = next(iter(loader))
    assert torch.equal(batch["region_a"], batch["region_b"]) and len(batch["key"]) == 4
    with pytest.raises(DatasetLayoutError, match="synthesize: true"):
        LUPersonDataModule(root=str(tmp_path / "missing")).setup("fit")
