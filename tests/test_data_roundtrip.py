"""Every synthetic writer's output is read by the parser users run on the real dataset."""

import pytest

from pedlightning.data.sources import (
    build_attribute_source,
    build_reid_source,
    build_text_source,
)
from pedlightning.data.synthetic import SYNTHETIC_WRITERS

REID = [("market1501", {}, {}), ("dukemtmc", {}, {}), ("occluded_duke", {}, {}),
        ("msmt17", {}, {}), ("msmt17", {"version": "V2"}, {"version": "V2"}),
        ("msmt17", {}, {"train_with_val": False})]


@pytest.mark.parametrize("name,writer_kwargs,parser_kwargs", REID)
def test_reid_roundtrip(tmp_path, name, writer_kwargs, parser_kwargs):
    root = SYNTHETIC_WRITERS[name](str(tmp_path / name), num_train_ids=6, num_test_ids=5, **writer_kwargs)
    source = build_reid_source(name, root, **parser_kwargs)
    assert source.num_train_pids == 6
    assert sorted({r.pid for r in source.train}) == list(range(6))
    assert {r.pid for r in source.query} <= {r.pid for r in source.gallery}
    # Every query has a gallery match from another camera (the protocol can evaluate it).
    for q in source.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in source.gallery)
    if name == "msmt17":
        with_val = parser_kwargs.get("train_with_val", True)
        assert len(source.train) == 6 * (6 + (1 if with_val else 0))


@pytest.mark.parametrize("name,json_name", [("cuhk_pedes", "reid_raw.json"), ("cuhk_pedes", "caption_all.json"),
                                            ("icfg_pedes", "ICFG-PEDES.json"), ("icfg_pedes", "ICFG_PEDES.json"),
                                            ("rstpreid", None)])
def test_text_roundtrip(tmp_path, name, json_name):
    kwargs = {"json_name": json_name} if json_name else {}
    root = SYNTHETIC_WRITERS[name](str(tmp_path / name), **kwargs)
    source = build_text_source(name, root)
    assert sorted({r.pid for r in source.train}) == list(range(source.num_train_pids))
    assert not {r.pid for r in source.test} & {r.pid for r in source.val}
    captions_per_image = {len(r.captions) for r in source.train}
    assert captions_per_image == ({1} if name == "icfg_pedes" else {2})


def test_pa100k_roundtrip(tmp_path):
    root = SYNTHETIC_WRITERS["pa100k"](str(tmp_path / "pa100k"), num_train=40, num_val=8, num_test=8)
    train = build_attribute_source("pa100k", root)
    trainval = build_attribute_source("pa100k", root, train_split="trainval")
    assert (len(train.train), len(train.val), len(train.test), len(trainval.train)) == (40, 8, 8, 48)
    assert train.attribute_names[0] == "Female" and train.num_attributes == 26
    # Exactly one age bucket and exactly one view per image, as in PA-100K.
    for record in train.train:
        assert sum(record.labels[1:4]) == 1 and sum(record.labels[4:7]) == 1
