"""export-onnx (ONNX == PyTorch with the task's test-time head, dynamic batch) and export-encoder's sidecar (it
rebuilds an identical encoder)."""

import json
import sys

import lightning as L
import numpy as np
import pytest
import torch

from pedlightning.data.datamodules import ReIDDataModule
from pedlightning.errors import CheckpointError, ConfigError
from pedlightning.inference import FeatureExtractor
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.tasks import ReIDModule
from pedlightning.tools import export_encoder, export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = (64, 32)
HALF = [0.5, 0.5, 0.5]
TASK = ["--task", "pedlightning.tasks.ReIDModule"]  # a plain Trainer's checkpoint does not record its class
ENCODERS = {
    # the ViT with TransReID's overlapping patches (stride 12 < patch 16), flip test and the post-BNNeck feature
    "vit": (ImageEncoderConfig("vit_tiny_test", SIZE, stride_size=12), dict(flip_test=True, neck_feat="after")),
    "resnet": (ImageEncoderConfig("resnet_tiny_test", SIZE, drop_path_rate=0.0), dict(neck_feat="after")),
}


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def checkpoint(request, tmp_path_factory, synthetic_market):
    """A ReID checkpoint after 2 training steps (the BNNeck's running statistics have moved), normalised with 0.5."""
    encoder, options = ENCODERS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    data = ReIDDataModule("market1501", synthetic_market, img_size=SIZE, batch_size=16, num_instances=4,
                          num_workers=0, mean=HALF, std=HALF)
    model = ReIDModule(encoder, **options)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, max_steps=2,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp))
    trainer.fit(model, data)
    ckpt = tmp / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    data.setup("test")
    return request.param, ckpt, [r.path for r in data.source.query]


def test_onnx_equals_pytorch_for_batches_of_1_and_3(checkpoint, tmp_path, capsys):
    import onnxruntime as ort

    name, ckpt, paths = checkpoint
    out = tmp_path / f"{name}.onnx"
    export_onnx.main(["--ckpt", str(ckpt), "--out", str(out), *TASK])
    printed = capsys.readouterr().out
    assert "batch 1:" in printed and "batch 3:" in printed and "tolerance 0.0001" in printed
    meta = json.loads((tmp_path / f"{name}.onnx.json").read_text())
    assert meta["mean"] == HALF and meta["img_size"] == list(SIZE) and meta["output"] == "features"
    extractor = FeatureExtractor.from_checkpoint(ckpt, task=ReIDModule)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images"
    for batch in (1, 3):
        images = extractor.preprocess(paths[:batch])
        got = session.run(None, {"images": images.numpy()})[0]
        expected = extractor(paths[:batch]).numpy()
        assert got.shape == (batch, meta["output_dim"])
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # the graph holds the test-time head: the post-BNNeck feature, not the bare encoder's
    with torch.no_grad():
        bare = extractor.task.encoder(images).numpy()
    assert np.abs(got - bare).max() > 1e-2


def test_a_failed_check_is_an_error(checkpoint, tmp_path):
    _, ckpt, _ = checkpoint
    with pytest.raises(export_onnx.ExportMismatchError, match="differs from PyTorch"):
        export_onnx.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "m.onnx"), *TASK, "--atol", "0",
                          "--check-batch-sizes", "2"])


def test_missing_onnx_packages_are_named(monkeypatch, checkpoint, tmp_path):
    _, ckpt, _ = checkpoint
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    with pytest.raises(ConfigError, match=r'needs onnxscript: pip install "pedlightning\[onnx\]"'):
        export_onnx.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "m.onnx"), *TASK])


def test_encoder_sidecar_rebuilds_an_identical_encoder(checkpoint, tmp_path, capsys):
    name, ckpt, _ = checkpoint
    weights = tmp_path / "encoder.pth"
    export_encoder.main([str(ckpt), str(weights)])
    assert f"sidecar {weights}.json" in capsys.readouterr().out
    meta = json.loads((tmp_path / "encoder.pth.json").read_text())
    task = ReIDModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert meta["img_size"] == list(SIZE) and meta["mean"] == HALF and meta["std"] == HALF
    assert meta["feature_dim"] == task.encoder.embed_dim and meta["source_checkpoint"] == str(ckpt)
    if name == "vit":
        assert meta["timm_model"] == "vit_tiny_patch16_224" and meta["model_kwargs"]["embed_dim"] == 64
        assert meta["patch_size"] == [16, 16] and meta["patch_stride"] == [12, 12] and meta["last_stride"] is None
    else:
        assert meta["timm_model"] == "resnet10t" and meta["patch_size"] is None and meta["last_stride"] == 1
    rebuilt = export_encoder.load_exported_encoder(str(weights))
    assert rebuilt.model.state_dict().keys() == task.encoder.model.state_dict().keys()
    images = torch.randn(3, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(images), task.encoder(images))
    (tmp_path / "encoder.pth.json").unlink()
    with pytest.raises(CheckpointError, match="no sidecar"):
        export_encoder.load_exported_encoder(str(weights))
