"""The data side of the datamodule/task contract: DataSpec of every datamodule, the one caption tokenizer."""

from __future__ import annotations

import ast
import pathlib
import pickle

import numpy as np
import pytest

from pedlightning.data.datamodules import (
    AttributeDataModule,
    LUPersonDataModule,
    ReIDDataModule,
    TextReIDDataModule,
)
from pedlightning.data.sources import PA100K_ATTRIBUTES
from pedlightning.data.synthetic import (
    write_cuhk_pedes,
    write_icfg_pedes,
    write_market1501,
    write_pa100k,
)
from pedlightning.data.tokenizer import build_tokenizer, tokenizer_name
from pedlightning.errors import ConfigError

SIZE = (64, 32)
START, END = 49406, 49407


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_is_clips_bpe_padded_and_truncated():
    tok = build_tokenizer("ViT-B-16", context_length=8)
    # CLIP's vocabulary: "a" = 320, "man" = 786, "in" = 530, "red" = 736.
    assert tok(["a man in red"]).tolist() == [[START, 320, 786, 530, 736, END, 0, 0]]
    long = tok("a man in red and a man in red and a man in red")
    assert long.shape == (1, 8) and long[0, 0] == START and long[0, -1] == END  # cut, still ends at END
    assert tok(["a", "a man"]).dtype.is_floating_point is False and tok(["a", "a man"]).shape == (2, 8)


def test_tokenizer_presets_and_errors():
    assert tokenizer_name("clip_tiny_test") == tokenizer_name("ViT-B-16") == "ViT-B-16"
    text = ["a woman wearing a blue jacket", "a man"]
    assert build_tokenizer("clip_tiny_test", 77)(text).equal(build_tokenizer("ViT-B-16", 77)(text))
    with pytest.raises(ConfigError, match="unknown tokenizer 'nope'"):
        build_tokenizer("nope")
    with pytest.raises(ConfigError, match="context_length"):
        build_tokenizer("ViT-B-16", 1)


def test_tokenizer_pickles_without_its_vocabulary():
    tok = build_tokenizer("ViT-B-16", 16)
    expected = tok(["a man"])
    blob = pickle.dumps(tok)
    assert len(blob) < 1000  # the 2 MB BPE tables are rebuilt in each loader worker, not copied
    assert pickle.loads(blob)(["a man"]).equal(expected)


def test_data_never_imports_models():
    root = pathlib.Path(__file__).resolve().parents[1] / "pedlightning" / "data"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(("pedlightning.models", "pedlightning.tasks"))]
    assert offenders == []


# ------------------------------------------------------------------------------------------------ DataSpec
def test_reid_spec(tmp_path):
    root = write_market1501(str(tmp_path / "m"), size=SIZE, num_train_ids=3, num_test_ids=3, num_junk=2,
                            num_distractors=2)
    data = ReIDDataModule("market1501", root, img_size=SIZE, num_workers=0, mean=(0.5,) * 3, std=(0.5,) * 3)
    spec = data.data_spec()
    assert spec.source == f"market1501 at {root}"
    assert (spec.img_size, spec.mean, spec.std, spec.num_classes) == (SIZE, (0.5,) * 3, (0.5,) * 3, 3)
    assert spec.num_attributes is None and spec.context_length is None
    assert set(spec.eval_items) == {"validate", "test", "predict"}
    queries, gallery = spec.eval_items["test"]
    parts = data.test_dataloader().dataset.parts  # the loader's part 0 (queries) and part 1 (gallery)
    assert list(queries) == [r.path for r in parts[0].records]
    assert list(gallery) == [r.path for r in parts[1].records]
    assert data.data_spec() is spec  # parsed once


def test_attribute_spec(tmp_path):
    root = write_pa100k(str(tmp_path / "pa"), size=SIZE, num_train=6, num_val=3, num_test=3)
    spec = AttributeDataModule("pa100k", root, img_size=SIZE).data_spec()
    labels = np.asarray([r.labels for r in AttributeDataModule("pa100k", root)._load_source().train])
    assert spec.num_attributes == 26 and spec.attribute_names == PA100K_ATTRIBUTES
    assert spec.positive_ratio == tuple(labels.sum(0) / 6)  # counts over the 6 training images
    assert spec.num_classes is None and spec.eval_items == {}


def test_text_spec_follows_model_selection(tmp_path):
    root = write_cuhk_pedes(str(tmp_path / "c"), size=SIZE, num_train_ids=3, num_val_ids=2, num_test_ids=2,
                            images_per_id=2)
    data = TextReIDDataModule("cuhk_pedes", root, img_size=SIZE, tokenizer="clip_tiny_test", context_length=32,
                              num_workers=0)
    spec = data.data_spec()
    source = data.source
    assert (spec.num_classes, spec.context_length, spec.tokenizer, spec.model_selection) == (3, 32, "ViT-B-16", "val")
    captions, images = spec.eval_items["validate"]
    assert len(captions) == 2 * len(images) == 2 * 2 * 2  # 2 ids x 2 images x 2 captions
    assert list(captions) == [c for r in source.val for c in r.captions]
    assert list(images) == [r.path for r in source.val]
    assert list(spec.eval_items["test"][1]) == [r.path for r in source.test]
    assert list(spec.eval_items["test"][0]) == list(data.test_dataloader().dataset.parts[0].captions)
    on_test = TextReIDDataModule("cuhk_pedes", root, img_size=SIZE, model_selection="test").data_spec()
    assert on_test.eval_items["validate"] == on_test.eval_items["test"] == spec.eval_items["test"]


def test_text_spec_without_val_split(tmp_path):
    root = write_icfg_pedes(str(tmp_path / "i"), size=SIZE, num_train_ids=3, num_test_ids=2, images_per_id=2)
    spec = TextReIDDataModule("icfg_pedes", root, img_size=SIZE).data_spec()
    assert set(spec.eval_items) == {"test", "predict"} and len(spec.eval_items["test"][0]) == 2 * 2


def test_luperson_spec(tmp_path):
    spec = LUPersonDataModule(str(tmp_path / "none"), img_size=SIZE).data_spec()
    assert spec.source == f"luperson at {tmp_path / 'none'}" and spec.img_size == SIZE
    assert spec.mean == (0.485, 0.456, 0.406) and spec.num_classes is None
