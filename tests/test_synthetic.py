"""Synthetic data: determinism, the exact real layouts, label/caption consistency, learnability."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import defaultdict

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pedlightning.data.synthetic import (
    CUHK_PEDES_ID_START,
    PA100K_ATTRIBUTES,
    SYNTHETIC_WRITERS,
    _io,
    describe,
    make_identities,
    make_identity,
    render_person,
    tokenize,
    write_cuhk_pedes,
    write_dukemtmc,
    write_icfg_pedes,
    write_luperson_folder,
    write_luperson_shards,
    write_market1501,
    write_msmt17,
    write_occluded_duke,
    write_pa100k,
    write_rstpreid,
)
from pedlightning.data.synthetic.__main__ import main
from pedlightning.data.synthetic.identity import IDENTITY_ATTRIBUTES
from pedlightning.errors import ConfigError

SIZE = (64, 32)
TINY = {
    "market1501": dict(num_train_ids=3, num_test_ids=3, num_junk=2, num_distractors=2),
    "dukemtmc": dict(num_train_ids=3, num_test_ids=3, num_gallery_only_ids=2),
    "occluded_duke": dict(num_train_ids=3, num_test_ids=3, num_gallery_only_ids=2),
    "msmt17": dict(num_train_ids=3, num_test_ids=3),
    "pa100k": dict(num_train=6, num_val=3, num_test=3),
    "cuhk_pedes": dict(num_train_ids=3, num_val_ids=2, num_test_ids=2),
    "icfg_pedes": dict(num_train_ids=3, num_test_ids=2),
    "rstpreid": dict(num_train_ids=3, num_val_ids=2, num_test_ids=2),
    "luperson": dict(num_images=12, num_videos=2),
    "luperson_shards": dict(num_images=12, shard_size=5, num_videos=2),
    "luperson_ta": dict(num_images=12, shard_size=5, num_videos=2),
}


def digest(root: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def files(folder: str) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------- identities, renderer, captions


def test_identities_are_consistent_and_deterministic():
    idents = make_identities(400, seed=3)
    assert [i.pid for i in idents] == list(range(400))
    for ident in idents:
        a = ident.attributes
        assert set(a) == set(IDENTITY_ATTRIBUTES) and len(a) == 23 and set(a.values()) <= {0, 1}
        assert a["AgeLess18"] + a["Age18-60"] + a["AgeOver60"] == 1
        assert a["Trousers"] + a["Shorts"] + a["Skirt&Dress"] == 1
        assert a["ShortSleeve"] + a["LongSleeve"] == 1
        assert a["UpperStride"] + a["UpperLogo"] + a["UpperPlaid"] + a["UpperSplice"] <= 1
        assert a["LowerStripe"] + a["LowerPattern"] <= 1
        if a["LongCoat"]:
            assert a["LongSleeve"] == 1 and ident.upper_pattern is None
        if ident.hair == "bald":
            assert not a["Female"] and not a["AgeLess18"]
        assert ident.lower_color != ident.upper_color
    rates = {k: np.mean([i.attributes[k] for i in idents]) for k in IDENTITY_ATTRIBUTES}
    assert all(0.02 < r < 0.98 for r in rates.values()), rates  # every attribute has positives and negatives
    assert make_identity(17, 3) == idents[17]
    assert make_identity(17, 4) != idents[17]


def test_render_is_deterministic_with_full_attributes():
    ident = make_identity(5, 0)
    img, attrs = render_person(ident, camera=2, seed=11, size=SIZE)
    img2, attrs2 = render_person(ident, camera=2, seed=11, size=SIZE)
    assert img.size == (32, 64) and img.mode == "RGB"
    assert img.tobytes() == img2.tobytes() and attrs == attrs2
    assert list(attrs) == list(PA100K_ATTRIBUTES)
    assert attrs["Front"] + attrs["Side"] + attrs["Back"] == 1
    assert {k: attrs[k] for k in IDENTITY_ATTRIBUTES} == ident.attributes
    assert render_person(ident, camera=2, seed=12, size=SIZE)[0].tobytes() != img.tobytes()
    for view, name in (("front", "Front"), ("side", "Side"), ("back", "Back")):
        _, a = render_person(ident, camera=2, seed=11, size=SIZE, view=view)
        assert a[name] == 1 and a["Front"] + a["Side"] + a["Back"] == 1
    plain = np.asarray(render_person(ident, camera=2, seed=11, view="front")[0], np.int16)
    occ = np.asarray(render_person(ident, camera=2, seed=11, view="front", occluded=True)[0], np.int16)
    changed = (np.abs(plain - occ).sum(-1) > 30).mean()
    assert 0.05 < changed < 0.8, changed
    with pytest.raises(ValueError, match="view"):
        render_person(ident, camera=2, seed=11, view="top")


def _band_features(img: Image.Image) -> np.ndarray:
    """Mean colour of 8 horizontal bands of the central half (a deliberately crude reID feature)."""
    a = np.asarray(img, np.float32) / 255.0
    h, w, _ = a.shape
    return a[:, w // 4 : 3 * w // 4].reshape(8, h // 8, -1, 3).mean(axis=(1, 2)).ravel()


def test_identity_is_recognisable_across_cameras_and_cameras_differ():
    """Nearest neighbour on mean colours matches identities across cameras far above chance (1/40)."""
    idents = make_identities(40, seed=7)
    accuracies = []
    for qcam, gcam in ((1, 2), (3, 4), (1, 6)):
        q = np.stack([_band_features(render_person(i, camera=qcam, seed=1, size=SIZE)[0]) for i in idents])
        g = np.stack([_band_features(render_person(i, camera=gcam, seed=2, size=SIZE)[0]) for i in idents])
        q, g = q - q.mean(0), g - g.mean(0)  # remove each camera's mean (background, colour cast)
        dist = ((q[:, None] - g[None]) ** 2).sum(-1)
        accuracies.append(float((dist.argmin(1) == np.arange(len(idents))).mean()))
    assert min(accuracies) >= 0.3, accuracies  # measured 0.40-0.65; chance is 0.025
    images = [render_person(idents[0], camera=c, seed=0, size=SIZE)[0] for c in range(1, 7)]
    means = [np.asarray(img, np.float32).mean((0, 1)) for img in images]
    gaps = [np.abs(means[i] - means[j]).sum() for i in range(6) for j in range(i + 1, 6)]
    assert np.median(gaps) > 15, gaps


def test_captions_follow_attributes_and_colours():
    for ident in make_identities(60, seed=1):
        _, attrs = render_person(ident, camera=1, seed=4, size=SIZE)
        caps = describe(ident, attrs, seed=4)
        assert len(caps) == 2 and caps[0] != caps[1] and caps == describe(ident, attrs, seed=4)
        for cap in caps:
            words = tokenize(cap)
            assert ident.upper_color in words and ident.lower_color in words, cap
            assert ("she" in words or "her" in words) == bool(attrs["Female"]), cap
            assert ("he" in words or "his" in words) == (not attrs["Female"]), cap
            assert ("back" in cap) == bool(attrs["Backpack"]), cap  # "backpack" / "bag on his back"
            assert ("coat" in words) == bool(attrs["LongCoat"]), cap
            assert ("boots" in words) <= bool(attrs["boots"]), cap
            assert ({"skirt", "dress"} & set(words) != set()) == bool(attrs["Skirt&Dress"]), cap
            assert ("glasses" in words) == bool(attrs["Glasses"]), cap
    assert tokenize("A man, in a T-shirt.") == ["a", "man", "in", "a", "t", "shirt"]
    assert len(describe(make_identity(0, 0), render_person(make_identity(0, 0), camera=1, seed=0)[1], 0, num=5)) == 5


# ---------------------------------------------------------------- determinism and safety of every writer


@pytest.mark.parametrize("name", sorted(SYNTHETIC_WRITERS))
def test_writer_is_byte_deterministic(name, tmp_path):
    writer, kw = SYNTHETIC_WRITERS[name], TINY[name]
    a = digest(writer(str(tmp_path / "a"), seed=0, size=SIZE, **kw))
    b = digest(writer(str(tmp_path / "b"), seed=0, size=SIZE, **kw))
    c = digest(writer(str(tmp_path / "c"), seed=1, size=SIZE, **kw))
    assert a and a == b
    assert a != c
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temp folders left behind


def test_writer_output_does_not_depend_on_the_process(tmp_path):
    """String hashing is randomised per process; the output must not be."""
    code = (
        "import sys; from pedlightning.data.synthetic import write_market1501;"
        "write_market1501(sys.argv[1], seed=2, size=(64, 32), num_train_ids=2, num_test_ids=2, num_junk=1,"
        " num_distractors=1)"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub")], check=True, env=env)
    here = write_market1501(str(tmp_path / "here"), seed=2, size=SIZE, num_train_ids=2, num_test_ids=2, num_junk=1,
                            num_distractors=1)
    assert digest(str(tmp_path / "sub")) == digest(here)


def test_writer_refuses_a_non_empty_root_and_accepts_an_empty_one(tmp_path):
    root = tmp_path / "market"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=re.escape(str(root))):
        write_market1501(str(root), size=SIZE, **TINY["market1501"])
    assert os.listdir(root) == ["keep.txt"] and (root / "keep.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="afile"):
        write_pa100k(str(tmp_path / "afile"), size=SIZE, **TINY["pa100k"])
    empty = tmp_path / "empty"
    empty.mkdir()
    write_pa100k(str(empty), size=SIZE, **TINY["pa100k"])
    assert sorted(os.listdir(empty)) == ["annotation.mat", "data"]


def test_writer_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def broken(shot, size):
        calls.append(shot)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return real(shot, size)

    real = _io.render_shot
    monkeypatch.setattr(_io, "render_shot", broken)
    with pytest.raises(RuntimeError, match="killed"):
        write_msmt17(str(tmp_path / "msmt"), size=SIZE, **TINY["msmt17"])
    assert os.listdir(tmp_path) == []


def test_writer_keeps_a_root_another_process_finished_first(tmp_path, monkeypatch):
    root = tmp_path / "duke"
    real = _io.save_image

    def racing(img, path):  # another rank publishes its copy while we are writing
        if not root.exists():
            root.mkdir()
            (root / "theirs.txt").write_text("done")
        real(img, path)

    monkeypatch.setattr(_io, "save_image", racing)
    assert write_dukemtmc(str(root), size=SIZE, **TINY["dukemtmc"]) == str(root)
    assert os.listdir(root) == ["theirs.txt"]
    assert os.listdir(tmp_path) == ["duke"]


def test_cli_writes_the_same_tree_as_python(tmp_path, capsys):
    main(["market1501", "--root", str(tmp_path / "cli"), "--seed", "5", "--size", "64", "32", "--num-train-ids", "3",
          "--num-test-ids", "3", "--num-junk", "1", "--num-distractors", "1"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    api = write_market1501(str(tmp_path / "api"), seed=5, size=SIZE, num_train_ids=3, num_test_ids=3, num_junk=1,
                           num_distractors=1)
    assert digest(str(tmp_path / "cli")) == digest(api)
    main(["luperson_ta", "--root", str(tmp_path / "ta"), "--size", "64", "32", "--num-images", "4",
          "--shard-size", "4"])
    with tarfile.open(tmp_path / "ta" / "shard-000000.tar") as tar:
        assert sum(n.endswith(".json") for n in tar.getnames()) == 4
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SYNTHETIC_WRITERS) and "--num-train-ids" in out


# ---------------------------------------------------------------- reID layouts

MARKET = re.compile(r"^(-1|\d{4})_c(\d)s([1-6])_(\d{6})_(\d{2})\.jpg$")
DUKE = re.compile(r"^(\d{4})_c(\d)_f(\d{7})\.jpg$")
MSMT = re.compile(r"^(\d{4})_(\d{3})_(\d{2})_(0113|0114|0302|0303)(morning|noon|afternoon)_(\d{4})_[01]\.jpg$")


def _parse(folder: str, pattern: re.Pattern) -> list[tuple[int, int]]:
    out = []
    for name in files(folder):
        m = pattern.match(name)
        assert m, f"{folder}/{name}"
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def _check_queries(query: list[tuple[int, int]], gallery: list[tuple[int, int]]) -> None:
    """Every query has a cross-camera gallery match and a same-camera one (to be dropped)."""
    for pid, cam in query:
        cams = [c for p, c in gallery if p == pid]
        assert any(c != cam for c in cams) and cam in cams, (pid, cam, cams)


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> str:
    return write_market1501(str(tmp_path_factory.mktemp("m") / "Market-1501"), size=SIZE)


def test_market_layout(market):
    assert files(market) == ["bounding_box_test", "bounding_box_train", "query"]
    train = _parse(os.path.join(market, "bounding_box_train"), MARKET)
    query = _parse(os.path.join(market, "query"), MARKET)
    gallery = _parse(os.path.join(market, "bounding_box_test"), MARKET)
    assert len(train) == 32 * 6 and len(query) == 32 * 2 and len(gallery) == 32 * 6 + 16 + 16
    assert sum(p == -1 for p, _ in gallery) == 16 and sum(p == 0 for p, _ in gallery) == 16
    assert all(p > 0 for p, _ in train + query)
    train_ids, test_ids = {p for p, _ in train}, {p for p, _ in query}
    assert len(train_ids) == 32 and len(test_ids) == 32 and not train_ids & test_ids
    assert {p for p, _ in gallery if p > 0} == test_ids
    assert {c for _, c in train + query + gallery} == set(range(1, 7))
    assert all(len({c for p, c in train if p == pid}) >= 2 for pid in train_ids)
    assert max(train_ids | test_ids) > 64  # sparse pids: parsers must relabel
    _check_queries(query, gallery)
    img = Image.open(os.path.join(market, "query", files(os.path.join(market, "query"))[0]))
    assert img.format == "JPEG" and img.size == (32, 64)


def test_duke_and_occluded_duke_layouts(tmp_path):
    duke = write_dukemtmc(str(tmp_path / "duke"), size=SIZE, query_occluded=0.0)
    occ = write_occluded_duke(str(tmp_path / "occ"), size=SIZE)
    for root in (duke, occ):
        assert files(root) == ["bounding_box_test", "bounding_box_train", "query"]
        train = _parse(os.path.join(root, "bounding_box_train"), DUKE)
        query = _parse(os.path.join(root, "query"), DUKE)
        gallery = _parse(os.path.join(root, "bounding_box_test"), DUKE)
        assert all(p > 0 for p, _ in train + query + gallery)  # no junk, no distractor pid 0
        assert {c for _, c in train + query + gallery} <= set(range(1, 9))
        assert not {p for p, _ in train} & {p for p, _ in gallery}
        assert len({p for p, _ in gallery} - {p for p, _ in query}) == 8  # gallery-only identities
        _check_queries(query, gallery)
    # Same seed -> same plan and names; occlusion is the only difference: every query, ~10% of the rest.
    a, b = digest(duke), digest(occ)
    assert a.keys() == b.keys()
    changed = defaultdict(list)
    for path in a:
        changed[path.split(os.sep)[0]].append(a[path] != b[path])
    assert all(changed["query"])
    assert 0.03 < np.mean(changed["bounding_box_test"]) < 0.25
    assert 0.03 < np.mean(changed["bounding_box_train"]) < 0.25


@pytest.mark.parametrize("version,folders", [("V1", ("train", "test")), ("V2", ("mask_train_v2", "mask_test_v2"))])
def test_msmt17_layout_and_lists(tmp_path, version, folders):
    root = write_msmt17(str(tmp_path / "msmt"), size=SIZE, version=version)
    lists = ["list_gallery.txt", "list_query.txt", "list_train.txt", "list_val.txt"]
    assert files(root) == sorted(lists + list(folders))
    entries = {}
    for name in lists:
        base = os.path.join(root, folders[0] if name in ("list_train.txt", "list_val.txt") else folders[1])
        rows = []
        for line in open(os.path.join(root, name), encoding="utf-8").read().splitlines():
            rel, pid = line.split(" ")
            folder, fname = rel.split("/")
            m = MSMT.match(fname)
            assert m and os.path.isfile(os.path.join(base, rel)), line
            assert int(pid) == int(folder) == int(m.group(1)) and 1 <= int(m.group(3)) <= 15, line
            rows.append((rel, int(pid), int(m.group(3))))
        entries[name] = rows
    listed = {
        folders[0]: {r for n in ("list_train.txt", "list_val.txt") for r, _, _ in entries[n]},
        folders[1]: {r for n in ("list_query.txt", "list_gallery.txt") for r, _, _ in entries[n]},
    }
    for folder, rels in listed.items():  # every image is listed exactly once
        on_disk = {f"{d}/{f}" for d in files(os.path.join(root, folder)) for f in files(os.path.join(root, folder, d))}
        assert on_disk == rels
    train_pids = {p for _, p, _ in entries["list_train.txt"]}
    assert train_pids == set(range(32)) and {p for _, p, _ in entries["list_val.txt"]} == train_pids
    assert len(entries["list_val.txt"]) == 32 and len(entries["list_train.txt"]) == 32 * 6
    assert {p for _, p, _ in entries["list_query.txt"]} == set(range(32))  # test pids restart at 0000
    assert len(entries["list_query.txt"]) == 64 and len(entries["list_gallery.txt"]) == 32 * 6
    query = [(p, c) for _, p, c in entries["list_query.txt"]]
    _check_queries(query, [(p, c) for _, p, c in entries["list_gallery.txt"]])


# ---------------------------------------------------------------- PA-100K


def test_pa100k_mat_nesting_and_labels(tmp_path):
    root = write_pa100k(str(tmp_path / "PA-100K"), seed=3, size=SIZE, num_train=20, num_val=6, num_test=8)
    assert files(root) == ["annotation.mat", "data"]
    assert files(os.path.join(root, "data")) == [f"{i:06d}.jpg" for i in range(1, 35)]
    mat = scipy.io.loadmat(os.path.join(root, "annotation.mat"))
    splits = ("train", "val", "test")
    keys = {"attributes"} | {f"{s}_images_name" for s in splits} | {f"{s}_label" for s in splits}
    assert keys <= set(mat)
    assert mat["attributes"].shape == (26, 1) and mat["attributes"].dtype == object
    assert [mat["attributes"][i][0][0] for i in range(26)] == list(PA100K_ATTRIBUTES)
    assert mat["attributes"][0][0][0] == "Female"
    first = 1
    for split, n in (("train", 20), ("val", 6), ("test", 8)):
        names = mat[f"{split}_images_name"]
        labels = mat[f"{split}_label"]
        assert names.shape == (n, 1) and labels.shape == (n, 26) and labels.dtype == np.uint8
        assert [names[i][0][0] for i in range(n)] == [f"{i:06d}.jpg" for i in range(first, first + n)]
        for i in range(n):
            ident = make_identity(first + i, 3)
            row = dict(zip(PA100K_ATTRIBUTES, labels[i].tolist()))
            assert {k: row[k] for k in IDENTITY_ATTRIBUTES} == ident.attributes
            assert row["Front"] + row["Side"] + row["Back"] == 1
        first += n
    assert mat["train_images_name"][0][0][0] == "000001.jpg"


# ---------------------------------------------------------------- text-to-image layouts


def test_cuhk_pedes_reid_raw_and_caption_all(tmp_path):
    raw = write_cuhk_pedes(str(tmp_path / "raw"), size=SIZE)
    records = json.load(open(os.path.join(raw, "reid_raw.json"), encoding="utf-8"))
    assert files(raw) == ["imgs", "reid_raw.json"]
    assert set(files(os.path.join(raw, "imgs"))) <= {"CUHK01", "CUHK03", "Market", "test_query", "train_query"}
    assert len(records) == 96 * 3
    patterns = {"CUHK01": r"\d{7}\.png", "CUHK03": r"\d+_\d\.jpg", "Market": MARKET.pattern[1:-1],
                "train_query": r"p\d+_s\d+\.jpg", "test_query": r"p\d+_s\d+\.jpg"}
    split_ids = defaultdict(set)
    for r in records:
        assert list(r) == ["split", "captions", "file_path", "processed_tokens", "id"]
        folder, name = r["file_path"].split("/")
        assert re.fullmatch(patterns[folder], name), r["file_path"]
        assert os.path.isfile(os.path.join(raw, "imgs", r["file_path"]))
        assert len(r["captions"]) == 2 and r["processed_tokens"] == [tokenize(c) for c in r["captions"]]
        split_ids[r["split"]].add(r["id"])
    assert split_ids["train"] == set(range(1, 65)) and split_ids["val"] == set(range(65, 81))
    assert split_ids["test"] == set(range(81, 97))
    assert not any("train_query" in r["file_path"] for r in records if r["split"] == "test")
    by_id = defaultdict(set)
    for r in records:
        by_id[r["id"]].add(r["file_path"])
    assert all(len(v) == 3 for v in by_id.values())

    alll = write_cuhk_pedes(str(tmp_path / "all"), size=SIZE, json_name="caption_all.json", num_train_ids=5,
                            num_val_ids=3, num_test_ids=4)
    assert files(alll) == ["caption_all.json", "imgs"]
    records = json.load(open(os.path.join(alll, "caption_all.json"), encoding="utf-8"))
    assert all(list(r) == ["captions", "file_path", "processed_tokens", "id"] for r in records)
    ids = sorted({r["id"] for r in records})
    assert CUHK_PEDES_ID_START == {"train": 1, "val": 11004, "test": 12004}
    assert ids == [1, 2, 3, 4, 5, 11004, 11005, 11006, 12004, 12005, 12006, 12007]
    assert all(os.path.isfile(os.path.join(alll, "imgs", r["file_path"])) for r in records)
    with pytest.raises(ConfigError, match="json_name"):
        write_cuhk_pedes(str(tmp_path / "bad"), json_name="captions.json")


def test_icfg_pedes_layout(tmp_path):
    root = write_icfg_pedes(str(tmp_path / "icfg"), size=SIZE, json_name="ICFG_PEDES.json", num_train_ids=6,
                            num_test_ids=4, images_per_id=3)
    assert files(root) == ["ICFG_PEDES.json", "imgs"] and files(os.path.join(root, "imgs")) == ["test", "train"]
    records = json.load(open(os.path.join(root, "ICFG_PEDES.json"), encoding="utf-8"))
    assert len(records) == 30
    pattern = re.compile(r"^(train|test)/(\d{4})/(\d{4})_\d{3}_\d{2}_\d{4}(morning|noon|afternoon)_\d{4}_[01]_ex\.jpg$")
    folder_pids = defaultdict(set)
    for r in records:
        assert list(r) == ["id", "file_path", "captions", "processed_tokens", "split"]
        m = pattern.match(r["file_path"])
        assert m and m.group(1) == r["split"] and m.group(2) == m.group(3), r["file_path"]
        assert os.path.isfile(os.path.join(root, "imgs", r["file_path"]))
        assert len(r["captions"]) == 1 and r["processed_tokens"] == [tokenize(r["captions"][0])]
        folder_pids[r["split"]].add((r["id"], int(m.group(2))))
    assert sorted(folder_pids["train"]) == [(i, i) for i in range(6)]
    assert sorted(folder_pids["test"]) == [(6 + i, i) for i in range(4)]  # json ids continue, folders restart


def test_rstpreid_layout(tmp_path):
    root = write_rstpreid(str(tmp_path / "rstp"), size=SIZE, num_train_ids=6, num_val_ids=2, num_test_ids=3)
    assert files(root) == ["data_captions.json", "imgs"]
    records = json.load(open(os.path.join(root, "data_captions.json"), encoding="utf-8"))
    assert len(records) == 11 * 5 and len(files(os.path.join(root, "imgs"))) == 55
    cams, splits = defaultdict(list), defaultdict(set)
    for r in records:
        assert list(r) == ["id", "img_path", "captions", "split"] and len(r["captions"]) == 2
        m = re.fullmatch(r"(\d{4})_c(\d{1,2})_(\d{4})\.jpg", r["img_path"])
        assert m and int(m.group(1)) == r["id"] and 1 <= int(m.group(2)) <= 15
        assert os.path.isfile(os.path.join(root, "imgs", r["img_path"]))
        cams[r["id"]].append(int(m.group(2)))
        splits[r["split"]].add(r["id"])
    assert all(len(set(c)) == 5 for c in cams.values())  # five images from five cameras
    assert splits == {"train": set(range(6)), "val": {6, 7}, "test": {8, 9, 10}}


# ---------------------------------------------------------------- LUPerson


def test_luperson_folder_layout(tmp_path):
    root = write_luperson_folder(str(tmp_path / "lup"), size=SIZE, num_images=30, num_videos=3)
    assert files(root) == ["v00000", "v00001", "v00002"]
    names = [n for v in files(root) for n in files(os.path.join(root, v))]
    assert len(names) == 30 and all(re.fullmatch(r"v\d{5}_\d{6}_\d{2}\.jpg", n) for n in names)
    assert all(n.startswith(v) for v in files(root) for n in files(os.path.join(root, v)))


def test_luperson_shards_with_text(tmp_path):
    root = write_luperson_shards(str(tmp_path / "ta"), size=SIZE, num_images=23, shard_size=10, with_text=True)
    assert files(root) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shards.json"]
    manifest = json.loads(open(os.path.join(root, "shards.json")).read())
    assert [(e["name"], e["num_samples"]) for e in manifest["shards"]] == [
        ("shard-000000.tar", 10), ("shard-000001.tar", 10), ("shard-000002.tar", 3)] and manifest["num_samples"] == 23
    assert [e["bytes"] for e in manifest["shards"]] == [os.path.getsize(os.path.join(root, e["name"]))
                                                        for e in manifest["shards"]]
    counts = []
    for shard in files(root)[:-1]:
        with tarfile.open(os.path.join(root, shard)) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
            names = [m.name for m in members]
            keys = [n[: -len(".jpg")] for n in names[0::2]]
            assert names == [f"{k}{ext}" for k in keys for ext in (".jpg", ".json")]
            assert all("." not in k for k in keys)
            for k in keys:
                meta = json.loads(tar.extractfile(f"{k}.json").read())
                assert list(meta) == ["captions", "attributes"] and len(meta["captions"]) == 2
                assert list(meta["attributes"]) == list(PA100K_ATTRIBUTES)
                assert set(meta["attributes"].values()) <= {0, 1}
                assert Image.open(tar.extractfile(f"{k}.jpg")).size == (32, 64)
            counts.append(len(keys))
    assert counts == [10, 10, 3]
    plain = write_luperson_shards(str(tmp_path / "plain"), size=SIZE, num_images=23, shard_size=10)
    with tarfile.open(os.path.join(plain, "shard-000000.tar")) as tar:
        assert all(n.endswith(".jpg") for n in tar.getnames()) and len(tar.getnames()) == 10


def test_luperson_shards_read_by_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    root = write_luperson_shards(str(tmp_path / "ta"), size=SIZE, num_images=7, shard_size=4, with_text=True)
    urls = [os.path.join(root, f) for f in files(root) if f.endswith(".tar")]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == 7
    assert all({"__key__", "jpg", "json"} <= set(s) for s in samples)


# ---------------------------------------------------------------- partial captions (LCR²S)
_FACTS = {"upper": r"\b(t-shirt|shirt|top|sweater|jacket|coat)\b", "lower": r"\b(trousers|pants|shorts|skirt|dress)\b",
          "shoes": r"\b(shoes|sneakers|boots)\b", "hat": r"\b(hat|cap)\b", "glasses": r"\bglasses\b",
          "hair": r"\b(hair|bald)\b", "bag": r"\b(backpack|bag|handbag)\b", "held": r"(something in front|an object)",
          "view": r"\b(camera|behind|side)\b"}


def _facts(caption: str) -> set[str]:
    """The facts a caption names, by the nouns of its clauses (each clause carries its colour)."""
    return {f for f, pattern in _FACTS.items() if re.search(pattern, caption.lower())}


def test_partial_captions_name_a_subset_and_the_identity_tells_more(tmp_path):
    from pedlightning.data.datamodules import TextReIDDataModule
    from pedlightning.data.sources import build_text_source

    tiny = dict(size=list(SIZE), num_train_ids=12, num_val_ids=1, num_test_ids=1, images_per_id=3)
    facts = {}
    for prob in (1.0, 0.5):
        root = str(tmp_path / f"cuhk{prob}")
        TextReIDDataModule("cuhk_pedes", root, synthesize=True, synthetic=tiny | {"mention_prob": prob}).prepare_data()
        per_id = defaultdict(list)
        for record in build_text_source("cuhk_pedes", root).train:
            per_id[record.pid] += [_facts(c) for c in record.captions]
        facts[prob] = per_id
    full, partial = facts[1.0], facts[0.5]
    assert all(len(v) == 6 for v in partial.values())  # 3 images x 2 captions
    covered = 0
    for pid, captions in partial.items():
        identity = set().union(*full[pid])  # what the identity's full captions tell
        assert all(c <= identity for c in captions)  # partial captions leave facts out, never invent any
        covered += set().union(*captions) == identity
    assert covered == 10  # together, the 6 partial captions of 10 of the 12 identities tell everything
    single = [len(c) for v in partial.values() for c in v]
    assert sum(single) / len(single) < 0.6 * sum(len(c) for v in full.values() for c in v) / len(single)
    # The support-set premise: for 10 of the 12 identities every single caption names fewer facts than
    # their captions together.
    richer = sum(max(len(c) for c in v) < len(set().union(*v)) for v in partial.values())
    assert richer == 10
    with pytest.raises(ConfigError, match="mention_prob"):
        describe(make_identity(0, 0), dict(make_identity(0, 0).attributes) | {"Front": 1, "Side": 0, "Back": 0},
                 0, mention_prob=0)


@pytest.mark.parametrize("name", ["icfg_pedes", "rstpreid"])
def test_partial_captions_in_the_other_text_writers(tmp_path, name):
    tiny = dict(TINY[name], size=SIZE)
    full = SYNTHETIC_WRITERS[name](str(tmp_path / "full"), **tiny)
    part = SYNTHETIC_WRITERS[name](str(tmp_path / "part"), mention_prob=0.3, **tiny)
    json_name = {"icfg_pedes": "ICFG-PEDES.json", "rstpreid": "data_captions.json"}[name]
    read = [json.load(open(os.path.join(r, json_name), encoding="utf-8")) for r in (full, part)]
    count = [sum(len(_facts(c)) for rec in recs for c in rec["captions"]) for recs in read]
    assert [len(recs) for recs in read] == [len(read[0])] * 2 and count[1] < 0.6 * count[0]
