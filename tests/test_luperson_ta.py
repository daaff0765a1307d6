"""LUPerson-TA: the sample format, its round trip through shards, attribute statistics, the VAL-PAT datamodule."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from pedlightning.data.datamodules import LUPersonDataModule, LUPersonTADataModule
from pedlightning.data.records import PersonAnnotation, PersonSample
from pedlightning.data.shards import (
    ErrorCounter,
    ShardStream,
    batches_per_rank,
    shard_sizes,
)
from pedlightning.data.sources.attributes import PA100K_ATTRIBUTES
from pedlightning.data.sources.luperson import (
    ANNOTATION_STATS,
    annotation_stats,
    find_shards,
    parse_annotation,
)
from pedlightning.data.synthetic import write_luperson_shards
from pedlightning.data.synthetic._io import render_shot
from pedlightning.data.synthetic.captions import describe
from pedlightning.data.synthetic.identity import make_identity
from pedlightning.data.synthetic.luperson import _luperson_shots
from pedlightning.data.tokenizer import build_tokenizer
from pedlightning.data.transforms.moco import (
    MoCoView,
    TwoViewCaptionTransform,
    draw_caption,
)
from pedlightning.data.transforms.samples import SampleTransform
from pedlightning.errors import DatasetLayoutError

SIZE = (64, 32)
WRITER = dict(size=SIZE, num_images=24, shard_size=6, num_videos=3, seed=5, with_text=True,
              missing_captions=0.25, missing_attributes=0.25)


class Annotation(SampleTransform):
    """Keeps what the reader parsed: the annotation itself."""

    def __call__(self, sample):
        return {"annotation": sample.annotation, "epoch": sample.epoch}


def expected_annotations(root: str) -> dict[str, PersonAnnotation]:
    """key -> what the writer put in: captions and attributes recomputed from its renderer and captioner."""
    out = {}
    raw = written_json(root)
    for shot in _luperson_shots(5, 24, 3, 3, 0.1):
        key = os.path.basename(shot.path)[: -len(".jpg")]
        _, attrs = render_shot(shot, SIZE)
        captions = tuple(describe(shot.identity, attrs, shot.seed, 2))
        vector = tuple(attrs[a] for a in PA100K_ATTRIBUTES)
        meta = raw[key]  # which parts the writer dropped (seeded), checked to be the explicit empty forms
        assert meta["captions"] in ([], list(captions)) and meta["attributes"] in (None, attrs)
        out[key] = PersonAnnotation(captions if meta["captions"] else (), vector if meta["attributes"] else None)
    return out


def written_json(root: str) -> dict[str, dict]:
    out = {}
    for shard in find_shards(root):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    out[m.name[: -len(".json")]] = json.loads(tar.extractfile(m).read())
    return out


@pytest.fixture(scope="module")
def ta(tmp_path_factory) -> str:
    return write_luperson_shards(str(tmp_path_factory.mktemp("ta") / "shards"), **WRITER)


# ------------------------------------------------------------------------------------------------ format
def test_round_trip_gives_back_written_captions_and_attributes(ta):
    expected = expected_annotations(ta)
    read = {s["key"]: s["annotation"] for s in ShardStream(find_shards(ta), Annotation(), shuffle_buffer=1)}
    assert read == expected and len(read) == 24
    missing_c = sum(not a.has_captions for a in read.values())
    missing_a = sum(not a.has_attributes for a in read.values())
    assert 0 < missing_c < 24 and 0 < missing_a < 24  # both kinds of gap are present, none dropped
    assert all(len(a.captions) == 2 for a in read.values() if a.has_captions)


def test_parse_annotation_forms_and_errors():
    flags = dict.fromkeys(PA100K_ATTRIBUTES, 0) | {"Female": 1, "boots": 1}
    ann = parse_annotation(json.dumps({"captions": ["a", "b"], "attributes": flags}))
    assert ann.captions == ("a", "b") and ann.attributes == (1,) + (0,) * 24 + (1,)
    assert parse_annotation(b'{"attributes": null}') == PersonAnnotation((), None)
    assert parse_annotation(b"{}").has_captions is False
    with pytest.raises(DatasetLayoutError, match="s0.tar: k1.json: not valid json"):
        parse_annotation(b"{", where="s0.tar: k1.json")
    with pytest.raises(DatasetLayoutError, match="'captions' must be a list of strings"):
        parse_annotation(b'{"captions": "one"}')
    with pytest.raises(DatasetLayoutError, match=r"attribute\(s\) \['boots'\] missing"):
        parse_annotation(json.dumps({"attributes": {k: v for k, v in flags.items() if k != "boots"}}))
    with pytest.raises(DatasetLayoutError, match="'Hat' is 2, expected 0 or 1"):
        parse_annotation(json.dumps({"attributes": flags | {"Hat": 2}}))


def test_captions_carry_colours_the_attribute_flags_do_not(ta):
    # Same 26 flags, another colour: the captions change exactly in the colour word.
    ident = make_identity(7, 0)
    attrs = dict(ident.attributes) | {"Front": 1, "Side": 0, "Back": 0}
    red = describe(dataclasses.replace(ident, upper_color="red", pattern_color="green"), attrs, 3, 2)
    blue = describe(dataclasses.replace(ident, upper_color="blue", pattern_color="green"), attrs, 3, 2)
    assert [c.replace("red", "blue") for c in red] == blue and red != blue
    # Every written caption names the person's upper and lower garment colours.
    read = {s["key"]: s["annotation"] for s in ShardStream(find_shards(ta), Annotation(), shuffle_buffer=1)}
    for shot in _luperson_shots(5, 24, 3, 3, 0.1):
        for caption in read[os.path.basename(shot.path)[:-4]].captions:
            assert shot.identity.upper_color in caption and shot.identity.lower_color in caption


def test_attribute_statistics_from_the_json_members_with_a_cache(ta, monkeypatch):
    expected = expected_annotations(ta)
    labelled = [a.attributes for a in expected.values() if a.has_attributes]
    stats = annotation_stats(find_shards(ta))
    assert (stats.num_samples, stats.with_attributes) == (24, len(labelled))
    assert stats.with_captions == sum(a.has_captions for a in expected.values())
    assert stats.positive_ratio == tuple(sum(col) / len(labelled) for col in zip(*labelled))
    assert os.path.isfile(os.path.join(ta, ANNOTATION_STATS))
    import pedlightning.data.sources.luperson as lup

    def no_scan(*_):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(lup, "_shard_stats", no_scan)
    assert annotation_stats(find_shards(ta)).positive_ratio == stats.positive_ratio
    monkeypatch.undo()
    shard = find_shards(ta)[0]
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed shard is scanned again
    calls = []
    original = lup._shard_stats
    monkeypatch.setattr(lup, "_shard_stats", lambda *a: calls.append(a[0]) or original(*a))
    assert annotation_stats(find_shards(ta)).positives == stats.positives and calls == [shard]


def _with_bad_json(root: str, good: str) -> str:
    os.makedirs(root)
    with tarfile.open(good) as src, tarfile.open(os.path.join(root, "shard-000000.tar"), "w") as dst:
        members = [m for m in src if m.isfile()]
        for i, m in enumerate(members):
            data = src.extractfile(m).read() if i != 1 else b'{"captions": 3}'
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return members[1].name[: -len(".json")]


def test_unreadable_annotations_are_counted_or_fail(ta, tmp_path):
    bad_key = _with_bad_json(str(tmp_path / "bad"), find_shards(ta)[0])
    errors = ErrorCounter("skip")
    samples = list(ShardStream(find_shards(str(tmp_path / "bad")), Annotation(), shuffle_buffer=1, errors=errors))
    assert len(samples) == 5 and errors.count == 1 and bad_key not in {s["key"] for s in samples}
    stats = annotation_stats(find_shards(str(tmp_path / "bad")), cache=False)
    assert stats.num_samples == 6 and [k for _, k, _ in stats.invalid] == [bad_key]
    with pytest.raises(DatasetLayoutError, match=bad_key):
        list(ShardStream(find_shards(str(tmp_path / "bad")), Annotation(), errors=ErrorCounter("fail")))
    strict = LUPersonTADataModule(str(tmp_path / "bad"), img_size=SIZE, on_error="fail", num_workers=0)
    with pytest.raises(DatasetLayoutError, match="1 unreadable LUPerson-TA annotation"):
        strict.data_spec()
    # Image-only transforms never parse the json: PersonMAE training ignores a broken annotation.
    assert len(list(ShardStream(find_shards(str(tmp_path / "bad")), lambda im: {}, errors=ErrorCounter("fail")))) == 6


# ------------------------------------------------------------------------------------------------ transforms
def test_moco_view_steps():
    image = Image.new("RGB", (32, 64))
    image.paste((200, 30, 40), (0, 0, 16, 64))
    plain = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_prob=0, grayscale_prob=0, blur_prob=0, mean=(0, 0, 0),
                 std=(1, 1, 1))
    expected = TF.to_tensor(TF.resize(image, [32, 16], TF.InterpolationMode.BICUBIC, antialias=True))
    torch.testing.assert_close(MoCoView((32, 16), flip_prob=0, **plain)(image), expected)
    torch.testing.assert_close(MoCoView((32, 16), flip_prob=1, **plain)(image), expected.flip(-1))
    gray = MoCoView((32, 16), flip_prob=0, **(plain | {"grayscale_prob": 1}))(image)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert MoCoView((32, 16))(image).shape == (3, 32, 16)


def test_caption_draw_and_missing_parts():
    assert [draw_caption(0, 0, "k", 3)] * 2 == [draw_caption(0, 0, "k", 3), draw_caption(0, 0, "k", 3)]
    draws = {draw_caption(0, epoch, "k", 3) for epoch in range(20)}
    assert draws == {0, 1, 2}
    tok = build_tokenizer("clip_tiny_test", 16)
    transform = TwoViewCaptionTransform(MoCoView((32, 16)), "clip_tiny_test", 16, num_attributes=26, seed=4)
    image = Image.new("RGB", (32, 64), (90, 90, 90))
    full = PersonAnnotation(("a man in red", "a man in blue", "a man"), (1,) * 26)
    out = transform(PersonSample(image, "v0_1_0", full, epoch=2))
    assert out["view_q"].shape == out["view_k"].shape == (3, 32, 16)
    assert torch.equal(out["tokens"], tok([full.captions[draw_caption(4, 2, "v0_1_0", 3)]])[0])
    assert out["has_caption"] is True and out["has_attributes"] is True
    assert torch.equal(out["attributes"], torch.ones(26))
    empty = transform(PersonSample(image, "v0_1_0", PersonAnnotation(), epoch=2))
    assert torch.equal(empty["tokens"], tok([""])[0]) and empty["has_caption"] is False
    assert torch.equal(empty["attributes"], torch.zeros(26)) and empty["has_attributes"] is False


# ------------------------------------------------------------------------------------------------ datamodules
def _ta_data(root, **kw):
    kw = dict(img_size=SIZE, batch_size=4, num_workers=0, shuffle_buffer=4, tokenizer="clip_tiny_test",
              context_length=16, seed=1) | kw
    return LUPersonTADataModule(root, **kw)


def test_datamodule_batches_spec_and_deterministic_captions(ta):
    expected = expected_annotations(ta)
    data = _ta_data(ta)
    data.setup("fit")
    loader = data.train_dataloader()
    assert len(loader) == batches_per_rank(shard_sizes(find_shards(ta)), 1, 4) == 6
    tok = build_tokenizer("clip_tiny_test", 16)
    shown = {}
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 6 and len({k for b in batches for k in b["key"]}) == 24
        batch = batches[0]
        assert batch["view_q"].shape == batch["view_k"].shape == (4, 3, *SIZE)
        assert batch["tokens"].shape == (4, 16) and batch["attributes"].shape == (4, 26)
        assert batch["has_caption"].dtype == torch.bool and batch["has_attributes"].dtype == torch.bool
        for b in batches:
            for i, key in enumerate(b["key"]):
                ann = expected[key]
                assert bool(b["has_caption"][i]) == ann.has_captions
                assert bool(b["has_attributes"][i]) == ann.has_attributes
                if ann.has_attributes:
                    assert b["attributes"][i].tolist() == list(ann.attributes)
                caption = ann.captions[draw_caption(1, epoch, key, 2)] if ann.has_captions else ""
                assert torch.equal(b["tokens"][i], tok([caption])[0])
                shown[epoch, key] = caption
    assert any(shown[0, k] != shown[1, k] for k in expected)  # another epoch, another caption for some
    spec = data.data_spec()
    assert spec.source == f"luperson_ta at {ta}" and spec.img_size == SIZE
    assert spec.attribute_names == PA100K_ATTRIBUTES and spec.num_attributes == 26
    assert spec.positive_ratio == annotation_stats(find_shards(ta)).positive_ratio
    assert (spec.context_length, spec.tokenizer, spec.num_classes) == (16, "ViT-B-16", None)


def test_datamodule_ranks_get_equal_disjoint_batches(ta):
    keys = []
    for rank in (0, 1):
        data = _ta_data(ta)
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        data.setup("fit")
        loader = data.train_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader) == batches_per_rank([6, 6, 6, 6], 2, 4) == 3
        keys.append({k for b in batches for k in b["key"]})
    assert not keys[0] & keys[1] and len(keys[0]) == len(keys[1]) == 12


def test_datamodule_synthesizes_and_luperson_takes_a_transform(tmp_path):
    root = str(tmp_path / "fresh")
    data = _ta_data(root, synthesize=True, synthetic={"num_images": 8, "shard_size": 4, "size": list(SIZE)})
    data.prepare_data()
    assert len(find_shards(root)) == 2 and data.data_spec().num_attributes == 26
    # The LUPerson datamodule with VAL-PAT's transform reads the same shards the same way.
    transform = TwoViewCaptionTransform(MoCoView(SIZE), "clip_tiny_test", 16)
    plain = LUPersonDataModule(root, source="shards", img_size=SIZE, batch_size=4, num_workers=0, transform=transform)
    batch = next(iter(plain.train_dataloader()))
    assert set(batch) == {"view_q", "view_k", "tokens", "has_caption", "attributes", "has_attributes", "key"}
    assert "transform" not in plain.hparams  # hyper-parameters stay plain (checkpoints reload weights_only)
