"""Dataset parsers on tiny hand-built trees in the exact real layouts (empty image files: parsers never open them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io

from pedlightning.data.records import AttributeImage, CaptionedImage, PersonImage
from pedlightning.data.sources import (
    ATTRIBUTE_SOURCES,
    CUHKPEDES,
    ICFGPEDES,
    MSMT17,
    PA100K,
    REID_SOURCES,
    TEXT_SOURCES,
    DukeMTMC,
    Market1501,
    OccludedDuke,
    RSTPReid,
    build_attribute_source,
    build_reid_source,
    build_text_source,
)
from pedlightning.errors import ConfigError, DatasetLayoutError


def touch(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()
    return path


def table_rows(table: str) -> dict[str, list[str]]:
    """Rows of a format_table table, keyed by the first cell."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    return {r[0]: r[1:] for r in rows[1:]}


# ---------------------------------------------------------------- Market-1501 / DukeMTMC-reID / Occluded-Duke

MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c3s1_000101_01.jpg",
                           "0010_c6s2_000101_02.jpg", "Thumbs.db"],
    "query": ["0003_c1s1_000001_00.jpg", "0003_c4s1_000002_00.jpg", "0005_c2s1_000003_00.jpg"],
    "bounding_box_test": ["0003_c2s1_000004_01.jpg", "0005_c5s1_000005_01.jpg", "0000_c1s1_000006_01.jpg",
                          "-1_c3s1_000007_01.jpg", "-1_c1s1_000008_01.jpg", "Thumbs.db"],
}
DUKE = {
    "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c8_f0046300.jpg", "0004_c1_f0000100.jpg"],
    "query": ["0005_c1_f0000001.jpg"],
    "bounding_box_test": ["0005_c7_f0000002.jpg", "0009_c3_f0000003.jpg"],
}


def write_tree(root: str, tree: dict[str, list[str]]) -> None:
    for folder, names in tree.items():
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for name in names:
            touch(os.path.join(root, folder, name))


# a user path with digits and underscores that look like a Market name: the parser must read file names only
USER_DIR = "runs_0042_c9s9_000001_01"


@pytest.mark.parametrize("sub", ["", "Market-1501-v15.09.15", "Market1501"])
def test_market_records_junk_dropped_distractors_kept(tmp_path, sub):
    root = str(tmp_path / USER_DIR)
    data = os.path.join(root, sub) if sub else root
    write_tree(data, MARKET)
    ds = Market1501(root)
    assert ds.root == data and ds.name == "Market-1501"
    tr = os.path.join(data, "bounding_box_train")
    assert ds.train == [
        PersonImage(os.path.join(tr, "0002_c1s1_000451_03.jpg"), 0, 0),
        PersonImage(os.path.join(tr, "0002_c2s1_000301_01.jpg"), 0, 1),
        PersonImage(os.path.join(tr, "0007_c3s1_000101_01.jpg"), 1, 2),
        PersonImage(os.path.join(tr, "0010_c6s2_000101_02.jpg"), 2, 5),
    ]
    assert [(r.pid, r.camid) for r in ds.query] == [(3, 0), (3, 3), (5, 1)]
    # sorted names: 0000 (distractor, kept), 0003, 0005; both -1 junk images dropped; Thumbs.db ignored
    assert [(os.path.basename(r.path), r.pid, r.camid) for r in ds.gallery] == [
        ("0000_c1s1_000006_01.jpg", 0, 0),
        ("0003_c2s1_000004_01.jpg", 3, 1),
        ("0005_c5s1_000005_01.jpg", 5, 4),
    ]
    assert all(os.path.isabs(r.path) for r in ds.train + ds.query + ds.gallery)
    assert ds.num_train_pids == 3 and ds.num_train_cams == 4
    rows = table_rows(ds.stats_table())
    assert rows == {"train": ["3", "4", "4"], "query": ["2", "3", "3"], "gallery": ["3", "3", "3"]}


@pytest.mark.parametrize("cls,sub", [(DukeMTMC, ""), (DukeMTMC, "DukeMTMC-reID"), (OccludedDuke, "Occluded_Duke")])
def test_duke_family(tmp_path, cls, sub):
    data = os.path.join(tmp_path, sub) if sub else str(tmp_path)
    write_tree(data, DUKE)
    ds = cls(str(tmp_path))
    assert ds.root == data
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 1), (0, 7), (1, 0)]
    assert [(r.pid, r.camid) for r in ds.query] == [(5, 0)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(5, 6), (9, 2)]
    assert ds.num_train_pids == 2 and ds.num_train_cams == 3


def test_market_missing_split_folder(tmp_path):
    write_tree(str(tmp_path), {k: v for k, v in MARKET.items() if k != "query"})
    with pytest.raises(DatasetLayoutError) as err:
        Market1501(str(tmp_path))
    msg = str(err.value)
    assert os.path.join(str(tmp_path), "query") in msg and "Expected layout" in msg and "bounding_box_test/" in msg


def test_market_missing_root(tmp_path):
    with pytest.raises(DatasetLayoutError, match="directory not found: .*nowhere"):
        Market1501(str(tmp_path / "nowhere"))


def test_market_empty_split_only_junk(tmp_path):
    write_tree(str(tmp_path), {**MARKET, "bounding_box_test": ["-1_c3s1_000007_01.jpg", "Thumbs.db"]})
    with pytest.raises(DatasetLayoutError) as err:
        Market1501(str(tmp_path))
    assert f"split folder {os.path.join(str(tmp_path), 'bounding_box_test')} contains no images" in str(err.value)


@pytest.mark.parametrize(
    "cls,tree,bad,expected",
    [
        (Market1501, MARKET, "0002_c1_000451.jpg", "unexpected image name"),
        (Market1501, MARKET, "0002_c7s1_000451_03.jpg", "camera c7 out of range 1..6"),
        (DukeMTMC, DUKE, "0001_c9_f0046182.jpg", "camera c9 out of range 1..8"),
        (DukeMTMC, DUKE, "0002_c1s1_000451_03.jpg", "unexpected image name"),
    ],
)
def test_bad_file_name_is_named(tmp_path, cls, tree, bad, expected):
    write_tree(str(tmp_path), tree)
    path = touch(os.path.join(str(tmp_path), "query", bad))
    with pytest.raises(DatasetLayoutError) as err:
        cls(str(tmp_path))
    assert expected in str(err.value) and path in str(err.value)


# ---------------------------------------------------------------- MSMT17

MSMT_LISTS = {
    "list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_05_0303morning_0016_0.jpg 0",
                       "0003/0003_000_15_0303noon_0001_0.jpg 3"],
    "list_val.txt": ["0001/0001_000_02_0303morning_0020_0.jpg 1", "0003/0003_002_07_0303noon_0002_0.jpg 3"],
    "list_query.txt": ["0000/0000_000_01_0303morning_0008_0.jpg 0", "0002/0002_000_03_0303noon_0009_0.jpg 2"],
    "list_gallery.txt": ["0000/0000_003_04_0303morning_0010_0.jpg 0", "0002/0002_001_09_0303noon_0011_0.jpg 2",
                         "0004/0004_000_12_0303afternoon_0012_0.jpg 4"],
}


def write_msmt(data: str, version: str = "V1", lists: dict[str, list[str]] = MSMT_LISTS) -> None:
    train_dir, test_dir = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}[version]
    os.makedirs(os.path.join(data, train_dir), exist_ok=True)
    os.makedirs(os.path.join(data, test_dir), exist_ok=True)
    for name, lines in lists.items():
        folder = train_dir if name in ("list_train.txt", "list_val.txt") else test_dir
        with open(os.path.join(data, name), "w") as f:
            f.write("".join(line + "\n" for line in lines))
        for line in lines:
            touch(os.path.join(data, folder, line.split()[0]))


@pytest.mark.parametrize(
    "version,sub", [("V1", ""), ("V1", "MSMT17_V1"), ("V1", "MSMT17"), ("V2", "MSMT17_V2"), ("V2", "MSMT17")]
)
def test_msmt17_train_with_val(tmp_path, version, sub):
    data = os.path.join(tmp_path, sub) if sub else str(tmp_path)
    write_msmt(data, version)
    ds = MSMT17(str(tmp_path), version=version)
    train_dir, test_dir = (("train", "test") if version == "V1" else ("mask_train_v2", "mask_test_v2"))
    assert ds.root == data and ds.name == f"MSMT17_{version}"
    # list_train then list_val; original pids 0, 1, 3 -> 0, 1, 2; camera = third '_' field minus one
    assert ds.train == [
        PersonImage(os.path.join(data, train_dir, "0000/0000_000_01_0303morning_0015_0.jpg"), 0, 0),
        PersonImage(os.path.join(data, train_dir, "0000/0000_001_05_0303morning_0016_0.jpg"), 0, 4),
        PersonImage(os.path.join(data, train_dir, "0003/0003_000_15_0303noon_0001_0.jpg"), 2, 14),
        PersonImage(os.path.join(data, train_dir, "0001/0001_000_02_0303morning_0020_0.jpg"), 1, 1),
        PersonImage(os.path.join(data, train_dir, "0003/0003_002_07_0303noon_0002_0.jpg"), 2, 6),
    ]
    assert ds.query[1] == PersonImage(os.path.join(data, test_dir, "0002/0002_000_03_0303noon_0009_0.jpg"), 2, 2)
    assert [(r.pid, r.camid) for r in ds.gallery] == [(0, 3), (2, 8), (4, 11)]
    assert ds.num_train_pids == 3 and ds.num_train_cams == 5
    assert table_rows(ds.stats_table()) == {
        "train": ["3", "5", "5"], "query": ["2", "2", "2"], "gallery": ["3", "3", "3"]
    }


def test_msmt17_train_only_ignores_val_list(tmp_path):
    write_msmt(str(tmp_path), lists={k: v for k, v in MSMT_LISTS.items() if k != "list_val.txt"})
    ds = MSMT17(str(tmp_path), train_with_val=False)
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (0, 4), (1, 14)]
    assert ds.num_train_pids == 2 and ds.num_train_cams == 3
    assert len(ds.query) == 2 and len(ds.gallery) == 3
    with pytest.raises(DatasetLayoutError, match="list_val.txt"):
        MSMT17(str(tmp_path), train_with_val=True)


def test_msmt17_missing_listed_images_are_all_named(tmp_path):
    write_msmt(str(tmp_path))
    gone = [os.path.join(str(tmp_path), "train/0001/0001_000_02_0303morning_0020_0.jpg"),
            os.path.join(str(tmp_path), "test/0004/0004_000_12_0303afternoon_0012_0.jpg")]
    for path in gone:
        os.remove(path)
    with pytest.raises(DatasetLayoutError) as err:
        MSMT17(str(tmp_path))
    msg = str(err.value)
    assert "2 referenced image(s) are missing" in msg and all(p in msg for p in gone)


def test_msmt17_layout_errors(tmp_path):
    write_msmt(str(tmp_path), lists={k: v for k, v in MSMT_LISTS.items() if k != "list_gallery.txt"})
    with pytest.raises(DatasetLayoutError) as err:
        MSMT17(str(tmp_path))
    assert os.path.join(str(tmp_path), "list_gallery.txt") in str(err.value) and "Expected layout" in str(err.value)

    os.rename(os.path.join(str(tmp_path), "test"), os.path.join(str(tmp_path), "elsewhere"))
    with pytest.raises(DatasetLayoutError, match="directory not found: .*test"):
        MSMT17(str(tmp_path))


def test_msmt17_wrong_version_says_which_to_set(tmp_path):
    write_msmt(os.path.join(tmp_path, "MSMT17_V2"), "V2")
    with pytest.raises(DatasetLayoutError, match="set version='V2'"):
        MSMT17(str(tmp_path), version="V1")
    with pytest.raises(ConfigError, match="V3"):
        MSMT17(str(tmp_path), version="V3")


@pytest.mark.parametrize(
    "line,expected",
    [
        ("0000/0000_000_01_0303morning_0015_0.jpg", "expected '<image path> <pid>'"),
        ("0000/0000_000_16_0303morning_0015_0.jpg 0", "camera 01..15"),
        ("0000/badname.jpg 0", "camera 01..15"),
    ],
)
def test_msmt17_malformed_list_line(tmp_path, line, expected):
    write_msmt(str(tmp_path), lists={**MSMT_LISTS, "list_query.txt": MSMT_LISTS["list_query.txt"] + [line]})
    with pytest.raises(DatasetLayoutError) as err:
        MSMT17(str(tmp_path))
    assert f"{os.path.join(str(tmp_path), 'list_query.txt')}, line 3" in str(err.value) and expected in str(err.value)


def test_msmt17_empty_list_file(tmp_path):
    write_msmt(str(tmp_path), lists={**MSMT_LISTS, "list_query.txt": []})
    with pytest.raises(DatasetLayoutError, match=r"list_query.txt has no entries \(empty split\)"):
        MSMT17(str(tmp_path))


# ---------------------------------------------------------------- PA-100K

ATTRS = ["Female", "AgeOver60", "Age18-60", "AgeLess18", "Front"]
LABELS = {
    "train": [[1, 0, 1, 0, 1], [0, 0, 1, 0, 0], [1, 1, 0, 0, 1], [0, 0, 1, 0, 1]],
    "val": [[1, 0, 0, 1, 0], [1, 0, 1, 0, 1]],
    "test": [[0, 1, 0, 0, 0], [1, 0, 0, 1, 1]],
}


def cell(strings: list[str]) -> np.ndarray:
    out = np.empty((len(strings), 1), dtype=object)
    out[:, 0] = strings
    return out


def write_pa100k(data: str, drop_key: str | None = None, labels: dict | None = None) -> dict[str, list[str]]:
    labels = labels or LABELS
    names, start, mat = {}, 1, {"attributes": cell(ATTRS)}
    for split in ("train", "val", "test"):
        names[split] = [f"{i:06d}.jpg" for i in range(start, start + len(labels[split]))]
        start += len(labels[split])
        mat[f"{split}_images_name"] = cell(names[split])
        mat[f"{split}_label"] = np.asarray(labels[split], dtype=np.uint8)
        for n in names[split]:
            touch(os.path.join(data, "data", n))
    mat.pop(drop_key, None)
    scipy.io.savemat(os.path.join(data, "annotation.mat"), mat)
    return names


def test_pa100k_mat_nesting_matches_original(tmp_path):
    write_pa100k(str(tmp_path))
    mat = scipy.io.loadmat(os.path.join(tmp_path, "annotation.mat"))
    assert mat["attributes"].shape == (5, 1) and mat["attributes"][2][0][0] == "Age18-60"
    assert mat["val_images_name"][1][0][0] == "000006.jpg" and mat["test_label"].shape == (2, 5)


@pytest.mark.parametrize("sub", ["", "PA-100K", "PA100k"])
def test_pa100k_train(tmp_path, sub):
    data = os.path.join(tmp_path, sub) if sub else str(tmp_path)
    write_pa100k(data)
    ds = PA100K(str(tmp_path))
    assert ds.root == data
    assert ds.attribute_names == tuple(ATTRS) and ds.num_attributes == 5
    assert ds.train[0] == AttributeImage(os.path.join(data, "data", "000001.jpg"), (1, 0, 1, 0, 1))
    assert [r.labels for r in ds.train] == [tuple(r) for r in LABELS["train"]]
    assert [os.path.basename(r.path) for r in ds.val] == ["000005.jpg", "000006.jpg"]
    assert [r.labels for r in ds.test] == [tuple(r) for r in LABELS["test"]]
    assert ds.positive_ratio == pytest.approx((2 / 4, 1 / 4, 3 / 4, 0.0, 3 / 4))
    assert table_rows(ds.stats_table()) == {"train": ["4", "2.25"], "val": ["2", "2.50"], "test": ["2", "2.00"]}


def test_pa100k_trainval(tmp_path):
    write_pa100k(str(tmp_path))
    ds = PA100K(str(tmp_path), train_split="trainval")
    assert [os.path.basename(r.path) for r in ds.train] == [f"{i:06d}.jpg" for i in range(1, 7)]
    assert len(ds.val) == 2 and len(ds.test) == 2
    assert ds.positive_ratio == pytest.approx((4 / 6, 1 / 6, 4 / 6, 1 / 6, 4 / 6))
    with pytest.raises(ConfigError, match="'all'"):
        PA100K(str(tmp_path), train_split="all")


def test_pa100k_missing_key_is_named(tmp_path):
    write_pa100k(str(tmp_path), drop_key="val_label")
    with pytest.raises(DatasetLayoutError) as err:
        PA100K(str(tmp_path))
    assert os.path.join(str(tmp_path), "annotation.mat") in str(err.value) and "'val_label' not found" in str(err.value)


def test_pa100k_label_width_mismatch(tmp_path):
    write_pa100k(str(tmp_path), labels={**LABELS, "test": [r[:4] for r in LABELS["test"]]})
    with pytest.raises(DatasetLayoutError, match=r"test_label has shape \(2, 4\), expected \(N, 5\)"):
        PA100K(str(tmp_path))


def test_pa100k_missing_image_and_folder(tmp_path):
    write_pa100k(str(tmp_path))
    gone = os.path.join(str(tmp_path), "data", "000007.jpg")
    os.remove(gone)
    with pytest.raises(DatasetLayoutError) as err:
        PA100K(str(tmp_path))
    assert "1 referenced image(s) are missing" in str(err.value) and gone in str(err.value)
    os.rename(os.path.join(str(tmp_path), "data"), os.path.join(str(tmp_path), "images"))
    with pytest.raises(DatasetLayoutError, match=f"directory not found: {os.path.join(str(tmp_path), 'data')}"):
        PA100K(str(tmp_path))
    os.remove(os.path.join(str(tmp_path), "annotation.mat"))
    with pytest.raises(DatasetLayoutError, match="annotation.mat"):
        PA100K(str(tmp_path))


# ---------------------------------------------------------------- CUHK-PEDES / ICFG-PEDES / RSTPReid

CUHK_RECORDS = [
    {"split": "train", "captions": ["a man in red", "red shirt man"], "file_path": "CUHK01/0363004.png", "id": 1},
    {"split": "train", "captions": ["the same man"], "file_path": "CUHK01/0363005.png", "id": 1},
    {"split": "train", "captions": ["a woman", "woman, bag", "third caption"], "file_path": "Market/0005.jpg",
     "id": 5},
    {"split": "val", "captions": ["val man", "val man 2"], "file_path": "CUHK03/11004_1.png", "id": 11004},
    {"split": "test", "captions": ["t1", "t2"], "file_path": "test_query/p12004_s1.jpg", "id": 12004},
    {"split": "test", "captions": ["t3", "t4"], "file_path": "test_query/p12004_s2.jpg", "id": 12004},
    {"split": "test", "captions": ["t5", "t6"], "file_path": "test_query/p12010_s1.jpg", "id": 12010},
]


def write_pedes(data: str, filename: str, records: list[dict], path_key: str = "file_path") -> None:
    os.makedirs(os.path.join(data, "imgs"), exist_ok=True)
    for r in records:
        touch(os.path.join(data, "imgs", r[path_key]))
        r.setdefault("processed_tokens", [c.split() for c in r["captions"]])
    with open(os.path.join(data, filename), "w") as f:
        json.dump(records, f)


def check_cuhk(ds: CUHKPEDES, data: str) -> None:
    assert ds.root == data
    assert ds.train[2] == CaptionedImage(
        os.path.join(data, "imgs", "Market/0005.jpg"), 1, ("a woman", "woman, bag", "third caption")
    )
    assert [r.pid for r in ds.train] == [0, 0, 1] and ds.num_train_pids == 2
    assert [r.pid for r in ds.val] == [11004] and [r.pid for r in ds.test] == [12004, 12004, 12010]
    assert ds.test[1].captions == ("t3", "t4")
    assert table_rows(ds.stats_table()) == {
        "train": ["2", "3", "6"], "val": ["1", "1", "2"], "test": ["2", "3", "6"]
    }


@pytest.mark.parametrize("sub", ["", "CUHK-PEDES"])
def test_cuhk_pedes_reid_raw(tmp_path, sub):
    data = os.path.join(tmp_path, sub) if sub else str(tmp_path)
    write_pedes(data, "reid_raw.json", [dict(r) for r in CUHK_RECORDS])
    check_cuhk(CUHKPEDES(str(tmp_path)), data)


def test_cuhk_pedes_caption_all_split_by_identity(tmp_path):
    write_pedes(str(tmp_path), "caption_all.json", [{k: v for k, v in r.items() if k != "split"} for r in CUHK_RECORDS])
    ds = CUHKPEDES(str(tmp_path))
    assert ds.annotation_path == os.path.join(str(tmp_path), "caption_all.json")
    check_cuhk(ds, str(tmp_path))


def test_cuhk_pedes_prefers_reid_raw(tmp_path):
    extra = {"captions": ["extra"], "file_path": "extra/1.jpg", "id": 7}
    write_pedes(str(tmp_path), "caption_all.json", [{k: v for k, v in r.items() if k != "split"} for r in CUHK_RECORDS]
                + [extra])
    write_pedes(str(tmp_path), "reid_raw.json", [dict(r) for r in CUHK_RECORDS])
    ds = CUHKPEDES(str(tmp_path))
    assert ds.annotation_path.endswith("reid_raw.json")
    check_cuhk(ds, str(tmp_path))


def test_cuhk_caption_all_id_out_of_range(tmp_path):
    records = [{k: v for k, v in r.items() if k != "split"} for r in CUHK_RECORDS] + [
        {"captions": ["x"], "file_path": "x/1.jpg", "id": 13004}
    ]
    write_pedes(str(tmp_path), "caption_all.json", records)
    with pytest.raises(DatasetLayoutError, match=r"record 7: id 13004 is outside the identity ranges"):
        CUHKPEDES(str(tmp_path))


ICFG_RECORDS = [
    {"split": "train", "captions": ["a"], "file_path": "train/0001/0001_000_01_0303morning_0001_0.jpg", "id": 3},
    {"split": "train", "captions": ["b"], "file_path": "train/0002/0002_000_01_0303morning_0002_0.jpg", "id": 9},
    {"split": "test", "captions": ["c"], "file_path": "test/0027/0027_001_01_0303morning_0029_0_ex.jpg", "id": 27},
]


@pytest.mark.parametrize("filename,sub", [("ICFG-PEDES.json", ""), ("ICFG_PEDES.json", "ICFG-PEDES")])
def test_icfg_pedes(tmp_path, filename, sub):
    data = os.path.join(tmp_path, sub) if sub else str(tmp_path)
    write_pedes(data, filename, [dict(r) for r in ICFG_RECORDS])
    ds = ICFGPEDES(str(tmp_path))
    assert [(r.pid, r.captions) for r in ds.train] == [(0, ("a",)), (1, ("b",))]
    assert ds.val == []
    assert ds.test == [CaptionedImage(os.path.join(data, "imgs", ICFG_RECORDS[2]["file_path"]), 27, ("c",))]
    assert table_rows(ds.stats_table())["val"] == ["0", "0", "0"]


def test_icfg_rejects_val_split(tmp_path):
    write_pedes(str(tmp_path), "ICFG-PEDES.json", [dict(r) for r in ICFG_RECORDS] + [
        {"split": "val", "captions": ["d"], "file_path": "val/1.jpg", "id": 40}
    ])
    with pytest.raises(DatasetLayoutError, match=r"record 3: split 'val' is not one of \['train', 'test'\]"):
        ICFGPEDES(str(tmp_path))


RSTP_RECORDS = [
    {"id": 0, "img_path": "0_0.jpg", "captions": ["c0", "c1"], "split": "train"},
    {"id": 0, "img_path": "0_1.jpg", "captions": ["c2", "c3"], "split": "train"},
    {"id": 4, "img_path": "4_0.jpg", "captions": ["c4", "c5"], "split": "train"},
    {"id": 3700, "img_path": "3700_0.jpg", "captions": ["v0", "v1"], "split": "val"},
    {"id": 3900, "img_path": "3900_0.jpg", "captions": ["t0", "t1"], "split": "test"},
]


def test_rstpreid_img_path_key(tmp_path):
    write_pedes(str(tmp_path), "data_captions.json", [dict(r) for r in RSTP_RECORDS], path_key="img_path")
    ds = RSTPReid(str(tmp_path))
    assert [(os.path.basename(r.path), r.pid) for r in ds.train] == [("0_0.jpg", 0), ("0_1.jpg", 0), ("4_0.jpg", 1)]
    assert ds.val == [CaptionedImage(os.path.join(str(tmp_path), "imgs", "3700_0.jpg"), 3700, ("v0", "v1"))]
    assert [r.pid for r in ds.test] == [3900] and ds.num_train_pids == 2


@pytest.mark.parametrize(
    "cls,filename,records,key,path_key",
    [
        (CUHKPEDES, "reid_raw.json", CUHK_RECORDS, "captions", "file_path"),
        (CUHKPEDES, "reid_raw.json", CUHK_RECORDS, "id", "file_path"),
        (CUHKPEDES, "reid_raw.json", CUHK_RECORDS, "split", "file_path"),
        (RSTPReid, "data_captions.json", RSTP_RECORDS, "img_path", "img_path"),
    ],
)
def test_pedes_missing_key_names_file_record_key(tmp_path, cls, filename, records, key, path_key):
    records = [dict(r) for r in records]
    write_pedes(str(tmp_path), filename, records, path_key=path_key)
    del records[2][key]
    with open(os.path.join(tmp_path, filename), "w") as f:
        json.dump(records, f)
    with pytest.raises(DatasetLayoutError) as err:
        cls(str(tmp_path))
    assert f"{os.path.join(str(tmp_path), filename)}: record 2 has no key '{key}'" in str(err.value)


def test_pedes_missing_images_are_listed(tmp_path):
    write_pedes(str(tmp_path), "reid_raw.json", [dict(r) for r in CUHK_RECORDS])
    gone = [os.path.join(str(tmp_path), "imgs", CUHK_RECORDS[i]["file_path"]) for i in (1, 5)]
    for path in gone:
        os.remove(path)
    with pytest.raises(DatasetLayoutError) as err:
        CUHKPEDES(str(tmp_path))
    msg = str(err.value)
    assert "2 referenced image(s) are missing" in msg and all(p in msg for p in gone) and "reid_raw.json" in msg


def test_pedes_layout_errors(tmp_path):
    os.makedirs(tmp_path / "imgs")
    with pytest.raises(DatasetLayoutError, match=r"expected one of \['ICFG-PEDES.json', 'ICFG_PEDES.json'\]"):
        ICFGPEDES(str(tmp_path))
    write_pedes(str(tmp_path), "reid_raw.json", [dict(r) for r in CUHK_RECORDS if r["split"] != "val"])
    with pytest.raises(DatasetLayoutError, match=r"reid_raw.json: no records in split 'val' \(empty split\)"):
        CUHKPEDES(str(tmp_path))
    os.rename(tmp_path / "imgs", tmp_path / "images")
    with pytest.raises(DatasetLayoutError, match=f"directory not found: {os.path.join(str(tmp_path), 'imgs')}"):
        CUHKPEDES(str(tmp_path))


def test_pedes_bad_captions(tmp_path):
    write_pedes(str(tmp_path), "data_captions.json", [dict(r) for r in RSTP_RECORDS], path_key="img_path")
    records = [dict(r) for r in RSTP_RECORDS]
    records[1]["captions"] = "not a list"
    with open(os.path.join(tmp_path, "data_captions.json"), "w") as f:
        json.dump(records, f)
    with pytest.raises(DatasetLayoutError, match="record 1: 'captions' must be a non-empty list of strings"):
        RSTPReid(str(tmp_path))


# ---------------------------------------------------------------- registries

def test_registries_build_the_same_sources(tmp_path):
    write_tree(str(tmp_path / "market"), MARKET)
    write_msmt(str(tmp_path / "msmt" / "MSMT17_V2"), "V2")
    write_pa100k(str(tmp_path / "pa"))
    write_pedes(str(tmp_path / "rstp"), "data_captions.json", [dict(r) for r in RSTP_RECORDS], path_key="img_path")
    assert set(REID_SOURCES) == {"market1501", "dukemtmc", "occluded_duke", "msmt17"}
    assert set(TEXT_SOURCES) == {"cuhk_pedes", "icfg_pedes", "rstpreid"} and set(ATTRIBUTE_SOURCES) == {"pa100k"}

    assert build_reid_source("market1501", str(tmp_path / "market")).gallery == Market1501(
        str(tmp_path / "market")).gallery
    msmt = build_reid_source("msmt17", str(tmp_path / "msmt"), version="V2", train_with_val=False)
    assert msmt.name == "MSMT17_V2" and len(msmt.train) == 3
    assert len(build_attribute_source("pa100k", str(tmp_path / "pa"), train_split="trainval").train) == 6
    assert build_text_source("rstpreid", str(tmp_path / "rstp")).num_train_pids == 2


@pytest.mark.parametrize(
    "build,name,kwargs,expected",
    [
        (build_reid_source, "market", {}, "unknown reID source 'market'; valid names: ['dukemtmc', 'market1501'"),
        (build_text_source, "cuhk", {}, "valid names: ['cuhk_pedes', 'icfg_pedes', 'rstpreid']"),
        (build_attribute_source, "peta", {}, "valid names: ['pa100k']"),
        (build_reid_source, "market1501", {"version": "V2"}, "does not take ['version']; it takes: ['root']"),
        (build_reid_source, "msmt17", {"verison": "V2", "trainval": 1}, "does not take ['trainval', 'verison']"),
        (build_attribute_source, "pa100k", {"split": "trainval"}, "it takes: ['root', 'train_split']"),
    ],
)
def test_registry_errors(tmp_path, build, name, kwargs, expected):
    with pytest.raises(ConfigError) as err:
        build(name, str(tmp_path), **kwargs)
    assert expected in str(err.value)


def test_sources_do_not_import_torch():
    code = "import sys, pedlightning.data.sources; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
