"""Image encoder, checkpoint loading, BNNeck and the open_clip towers (tiny models, CPU, offline)."""

from __future__ import annotations

from dataclasses import asdict

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pedlightning.data.tokenizer import build_tokenizer
from pedlightning.errors import CheckpointError, ConfigError
from pedlightning.models import (
    BNNeck,
    ImageEncoder,
    ImageEncoderConfig,
    load_pretrained,
)
from pedlightning.models.checkpoint import infer_source_grid
from pedlightning.models.text import (
    CLIP_PRESETS,
    TextEncoder,
    TextEncoderConfig,
    build_clip,
)

TINY_VIT = dict(depth=2, embed_dim=64, num_heads=2)
# A timm ViT with CLIP's layout (pre-norm, LayerNorm eps 1e-5, no patch-embed bias) at the tiny CLIP size.
TINY_CLIP_VIT = ("vit_base_patch16_clip_224", TINY_VIT)


def _timm_vit(img_size=(224, 224)) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=img_size, **TINY_VIT)


def _interpolate_grid(posemb: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Independent reference: bicubic, anti-aliased resize of the patch positions (prefix = 1 CLS token)."""
    cls, grid = posemb[:, :1], posemb[:, 1:]
    grid = grid.reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)], dim=1)


# ---------------------------------------------------------------------------------------------------- encoders


@pytest.mark.parametrize(("img_size", "grid"), [((64, 32), (4, 2)), ((256, 128), (16, 8))])
def test_vit_shapes(img_size, grid):
    enc = ImageEncoder("vit_tiny_test", img_size=img_size)
    x = torch.randn(2, 3, *img_size)
    assert enc.is_vit and enc.embed_dim == 64 and enc.num_prefix_tokens == 1
    assert enc.patch_grid == grid
    tokens = enc.forward_tokens(x)
    assert tokens.shape == (2, 1 + grid[0] * grid[1], 64)
    enc.eval()
    torch.testing.assert_close(enc(x), enc.forward_tokens(x)[:, 0])  # the CLS token after the final norm


@pytest.mark.parametrize(("img_size", "stride"), [((256, 128), 12), ((64, 32), 12), ((64, 32), 8)])
def test_overlapping_patch_embed_token_count(img_size, stride):
    enc = ImageEncoder("vit_tiny_test", img_size=img_size, stride_size=stride)
    grid = ((img_size[0] - 16) // stride + 1, (img_size[1] - 16) // stride + 1)  # TransReID's formula
    assert enc.patch_grid == grid
    assert enc.model.pos_embed.shape == (1, 1 + grid[0] * grid[1], 64)
    assert enc.forward_tokens(torch.randn(1, 3, *img_size)).shape == (1, 1 + grid[0] * grid[1], 64)
    assert enc.model.patch_embed.proj.stride == (stride, stride)
    assert enc.model.patch_embed.proj.kernel_size == (16, 16)


def test_transreid_grid_is_21x10():
    assert ImageEncoder("vit_tiny_test", img_size=(256, 128), stride_size=12).patch_grid == (21, 10)


def test_resnet_last_stride_doubles_the_final_map():
    x = torch.randn(2, 3, 64, 32)
    native = ImageEncoder("resnet_tiny_test", last_stride=2)
    reid = ImageEncoder("resnet_tiny_test", last_stride=1)
    assert not reid.is_vit and reid.patch_grid is None and reid.num_prefix_tokens == 0
    assert native.model.forward_features(x).shape == (2, 128, 2, 1)  # stride 32
    assert reid.model.forward_features(x).shape == (2, 128, 4, 2)  # stride 16
    assert reid(x).shape == (2, reid.embed_dim) == (2, 128)
    # Same parameters either way, so ImageNet weights load into the stride-1 network.
    assert {k: v.shape for k, v in native.state_dict().items()} == {k: v.shape for k, v in reid.state_dict().items()}
    reid.load_state_dict(native.state_dict())
    reid.eval()
    feats = reid.model.forward_features(x)
    torch.testing.assert_close(reid(x), feats.mean(dim=(2, 3)))  # global average pooling


def test_encoder_errors():
    with pytest.raises(ConfigError, match="CNN"):
        ImageEncoder("resnet_tiny_test").forward_tokens(torch.randn(1, 3, 64, 32))
    with pytest.raises(ConfigError, match="not_a_model"):
        ImageEncoder("not_a_model")
    with pytest.raises(ConfigError, match="stride_size"):
        ImageEncoder("resnet_tiny_test", stride_size=12)


def test_model_kwargs_override_preset():
    enc = ImageEncoder("vit_tiny_test", img_size=(64, 32), model_kwargs={"depth": 3})
    assert len(enc.model.blocks) == 3


# ---------------------------------------------------------------------------------------- checkpoint loading


def test_infer_source_grid():
    assert infer_source_grid(196, (16, 8)) == (14, 14)  # public 224x224 checkpoints
    assert infer_source_grid(128, (24, 8)) == (16, 8)  # 256x128 -> 384x128
    assert infer_source_grid(192, (16, 8)) == (24, 8)  # 384x128 -> 256x128
    assert infer_source_grid(210, (16, 8)) == (21, 10)  # TransReID stride 12


def test_timm_224_checkpoint_into_256x128(tmp_path):
    src = _timm_vit()
    with torch.no_grad():  # a smooth position embedding: constant channel 0, channel 1 varies along rows only
        rows = torch.arange(14.0).repeat_interleave(14) / 13
        src.pos_embed[0, 1:, 0] = 0.5
        src.pos_embed[0, 1:, 1] = rows
        src.pos_embed[0, 0] = 3.0
    path = tmp_path / "vit224.pth"
    torch.save(src.state_dict(), path)

    enc = ImageEncoder("vit_tiny_test", img_size=(256, 128), pretrained=str(path))
    report = enc.pretrained_report
    assert sorted(report.loaded) == sorted(enc.model.state_dict())
    assert report.missing == report.unexpected == report.skipped == []
    assert report.resized == ["pos_embed"] and "14x14 -> 16x8" in report.notes["pos_embed"]

    pos = enc.model.pos_embed.detach()
    assert pos.shape == (1, 129, 64)
    torch.testing.assert_close(pos[0, 0], torch.full((64,), 3.0))  # CLS position untouched
    torch.testing.assert_close(pos[0, 1:, 0], torch.full((128,), 0.5))  # a constant stays constant
    col = pos[0, 1:, 1].reshape(16, 8)
    torch.testing.assert_close(col, col[:, :1].expand(16, 8))  # still constant along the width
    assert torch.all(col[1:, 0] > col[:-1, 0])  # and increasing down the rows
    torch.testing.assert_close(pos, _interpolate_grid(src.pos_embed.detach(), (14, 14), (16, 8)))
    for key, value in src.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(enc.model.state_dict()[key], value, rtol=0, atol=0)


def test_lightning_checkpoint_loads_only_the_student(tmp_path):
    student = ImageEncoder("vit_tiny_test", img_size=(64, 32))
    teacher = ImageEncoder("vit_tiny_test", img_size=(64, 32))
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(7.0)
    state = {f"encoder.{k}": v for k, v in student.state_dict().items()}
    state.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
    state.update({"decoder.pred.weight": torch.zeros(768, 64), "decoder.mask_token": torch.zeros(1, 1, 64)})
    path = tmp_path / "personmae.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "hyper_parameters": {"lr": 1e-3}}, path)

    enc = ImageEncoder("vit_tiny_test", img_size=(64, 32), pretrained=str(path))
    report = enc.pretrained_report
    assert report.prefix == "encoder.model."
    assert len(report.loaded) == len(enc.model.state_dict()) and not report.missing and not report.resized
    assert set(report.ignored) == {k for k in state if not k.startswith("encoder.")}
    for key, value in student.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[key], value, rtol=0, atol=0)

    fresh = ImageEncoder("vit_tiny_test", img_size=(64, 32))
    load_pretrained(fresh.model, str(path), prefix="teacher.model")
    assert torch.all(fresh.model.blocks[0].attn.qkv.weight == 7.0)


def test_mae_checkpoint_and_ddp_prefix(tmp_path):
    src = _timm_vit()
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    state.update({"module.mask_token": torch.zeros(1, 1, 64), "module.decoder_pred.weight": torch.zeros(768, 64)})
    path = tmp_path / "mae.pth"
    torch.save({"model": state, "epoch": 799}, path)

    model = _timm_vit(img_size=(64, 32))
    report = load_pretrained(model, str(path))
    assert len(report.loaded) == len(model.state_dict()) and report.resized == ["pos_embed"]
    assert sorted(report.unexpected) == ["decoder_pred.weight", "mask_token"]
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight, rtol=0, atol=0)


def test_own_256x128_checkpoint_into_384x128(tmp_path):
    enc256 = ImageEncoder("vit_tiny_test", img_size=(256, 128))
    path = tmp_path / "encoder.pth"
    torch.save(enc256.state_dict(), path)
    enc384 = ImageEncoder("vit_tiny_test", img_size=(384, 128), pretrained=str(path))
    assert enc384.pretrained_report.notes["pos_embed"] == "grid 16x8 -> 24x8"
    expected = _interpolate_grid(enc256.model.pos_embed.detach(), (16, 8), (24, 8))
    torch.testing.assert_close(enc384.model.pos_embed.detach(), expected)


def test_mismatched_tensor_is_reported_and_strict_raises(tmp_path):
    src = _timm_vit(img_size=(64, 32))
    state = src.state_dict()
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(100, 64)  # cannot be resized
    state["head.weight"] = torch.zeros(10, 64)  # a classifier the encoder does not have
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)

    model = _timm_vit(img_size=(64, 32))
    before = model.blocks[0].mlp.fc1.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc1\.weight"):
        load_pretrained(model, str(path), strict=True)
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, before, rtol=0, atol=0)  # unchanged on failure

    report = load_pretrained(model, str(path))
    assert report.skipped == ["blocks.0.mlp.fc1.weight"]
    assert report.notes["blocks.0.mlp.fc1.weight"] == "checkpoint (100, 64) vs model (256, 64)"
    assert report.unexpected == ["head.weight"] and report.missing == []
    assert len(report.loaded) == len(model.state_dict()) - 1
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, before, rtol=0, atol=0)
    assert "skipped (1): blocks.0.mlp.fc1.weight" in report.summary()


def test_unreadable_checkpoints_name_the_file(tmp_path):
    model = _timm_vit(img_size=(64, 32))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_pretrained(model, str(garbage))
    with pytest.raises(CheckpointError, match="missing.pth"):
        load_pretrained(model, str(tmp_path / "missing.pth"))
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(CheckpointError, match="list.pth.*expected a state dict"):
        load_pretrained(model, str(not_a_dict))
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo.bar": torch.zeros(3)}, unrelated)
    with pytest.raises(CheckpointError, match=r"unrelated.pth.*expected keys like \['cls_token'"):
        load_pretrained(model, str(unrelated))
    wider = tmp_path / "wider.pth"  # the same architecture at another width: every key matches, no shape does
    torch.save({k: torch.zeros(*(d + 1 for d in v.shape)) for k, v in model.state_dict().items()}, wider)
    with pytest.raises(CheckpointError, match=r"wider.pth.*every shape differs.*cls_token: checkpoint \(2, 2, 65\) "
                                              r"vs model \(1, 1, 64\)"):
        load_pretrained(model, str(wider))


def _tiny_clip_encoder(img_size, pretrained=None) -> ImageEncoder:
    name, kwargs = TINY_CLIP_VIT
    return ImageEncoder(name, img_size=img_size, drop_path_rate=0.0, pretrained=pretrained, model_kwargs=kwargs)


def test_open_clip_visual_into_timm_vit_gives_the_same_features(tmp_path):
    clip224, _ = build_clip("clip_tiny_test", image_size=(224, 224))
    path = tmp_path / "open_clip.pt"
    torch.save(clip224.state_dict(), path)

    enc = _tiny_clip_encoder((64, 32), str(path)).eval()
    report = enc.pretrained_report
    assert report.prefix == "visual." and sorted(report.loaded) == sorted(enc.model.state_dict())
    assert report.missing == report.unexpected == report.skipped == [] and report.resized == ["pos_embed"]
    assert "visual.proj" in report.ignored and "token_embedding.weight" in report.ignored

    clip, clip_report = build_clip("clip_tiny_test", image_size=(64, 32), pretrained=str(path))
    assert clip_report.resized == ["visual.positional_embedding"]
    clip.eval()
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x) @ clip.visual.proj, clip.encode_image(x), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_clip_checkpoint(tmp_path):
    """OpenAI's CLIP .pt is a TorchScript archive: read with torch.jit.load, never with pickle."""
    clip, _ = build_clip("clip_tiny_test", image_size=(224, 224))

    class Visual(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = clip.visual

        def forward(self, x):
            return self.visual(x)

    path = tmp_path / "ViT-tiny.pt"
    torch.jit.trace(Visual().eval(), torch.randn(1, 3, 224, 224), check_trace=False).save(str(path))
    enc = _tiny_clip_encoder((64, 32), str(path))
    assert sorted(enc.pretrained_report.loaded) == sorted(enc.model.state_dict())
    torch.testing.assert_close(enc.model.cls_token[0, 0], clip.visual.class_embedding.detach(), rtol=0, atol=0)
    tower = ImageEncoder("open_clip:clip_tiny_test", img_size=(64, 32), drop_path_rate=0.0, pretrained=str(path))
    assert tower.pretrained_report.prefix == "visual." and tower.pretrained_report.missing == []
    assert tower.pretrained_report.resized == ["positional_embedding"]
    torch.testing.assert_close(tower.model.proj, clip.visual.proj.detach(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------- heads


def test_bnneck():
    torch.manual_seed(0)
    neck = BNNeck(256, 100)
    assert neck.classifier.bias is None and not neck.bn.bias.requires_grad
    assert torch.all(neck.bn.weight == 1) and torch.all(neck.bn.bias == 0)
    assert abs(neck.classifier.weight.std().item() - 0.001) < 0.0001
    x = torch.randn(8, 256) * 3 + 1
    bn_feat, logits = neck(x)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(bn_feat, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, expected @ neck.classifier.weight.t(), rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------------------------------------- text


def test_tokenizer():
    tok = build_tokenizer("ViT-B-16", context_length=77)
    ids = tok(["a man in a red shirt", "a woman"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, 0] == 49406 and ids[0, 7] == 49407 and torch.all(ids[0, 8:] == 0)  # SOT, 6 words, EOT, pad
    assert build_tokenizer("clip_tiny_test", context_length=32)(["one caption"]).shape == (1, 32)


def test_clip_towers_shapes_and_eot_pooling():
    torch.manual_seed(0)
    image, text_tower = ImageEncoder("open_clip:clip_tiny_test", img_size=(64, 32)).eval(), \
        TextEncoder("clip_tiny_test").eval()
    assert image.embed_dim == text_tower.embed_dim == 64
    assert image(torch.randn(2, 3, 64, 32)).shape == (2, 64)
    tokens = build_tokenizer("clip_tiny_test", 77)(["a man in a red shirt", "a woman with a bag"])
    with torch.no_grad():
        text = text_tower(tokens)
        assert text.shape == (2, 64)
        # The feature is read at the end-of-text token under a causal mask: what follows it does not matter.
        noisy = tokens.clone()
        noisy[:, 20:] = torch.randint(1, 49000, (2, 57))
        torch.testing.assert_close(text_tower(noisy), text)


def test_clip_checkpoint_resized_to_rectangular_grid(tmp_path):
    src, _ = build_clip("clip_tiny_test", image_size=(224, 224))
    state = src.state_dict()
    state.update({"input_resolution": torch.tensor(224), "context_length": torch.tensor(77)})  # OpenAI metadata
    path = tmp_path / "clip.pt"
    torch.save(state, path)

    model, report = build_clip("clip_tiny_test", image_size=(384, 128), pretrained=str(path))
    assert isinstance(model, open_clip.CLIP) and model.visual.grid_size == (24, 8)
    assert report.resized == ["visual.positional_embedding"]
    assert report.notes["visual.positional_embedding"] == "grid 14x14 -> 24x8"
    assert report.missing == report.unexpected == report.skipped == []
    assert sorted(report.ignored) == ["context_length", "input_resolution"]
    expected = _interpolate_grid(src.visual.positional_embedding.detach()[None], (14, 14), (24, 8))[0]
    torch.testing.assert_close(model.visual.positional_embedding.detach(), expected)
    torch.testing.assert_close(model.token_embedding.weight, src.token_embedding.weight, rtol=0, atol=0)


def test_named_open_clip_config_at_384x128():
    model, report = build_clip("ViT-B-16-quickgelu", image_size=(384, 128))
    assert report is None and model.visual.grid_size == (24, 8)
    assert model.visual.positional_embedding.shape == (1 + 24 * 8, 768)
    assert any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())
    assert model.positional_embedding.shape == (77, 512)


def test_build_clip_errors():
    with pytest.raises(ConfigError, match="ViT-Q-99"):
        build_clip("ViT-Q-99")


# ------------------------------------------------------------------------------- encoder configs, CLIP towers


def test_image_encoder_from_config_dict_and_overrides():
    cfg = ImageEncoderConfig(name="vit_tiny_test", img_size=[64, 32], drop_path_rate=0.3, model_kwargs={"depth": 3})
    assert cfg.img_size == (64, 32)
    enc = ImageEncoder.from_config(asdict(cfg), drop_path_rate=0.0)  # checkpoints store the config as a dict
    assert enc.patch_grid == (4, 2) and len(enc.model.blocks) == 3
    assert all(b.drop_path1.__class__ is nn.Identity for b in enc.model.blocks)  # rate 0 -> no DropPath at all
    with pytest.raises(ConfigError, match=r"unknown ImageEncoderConfig field\(s\) \['backbone'\]"):
        ImageEncoder.from_config({"backbone": "resnet50"})
    with pytest.raises(ConfigError, match="img_size must be"):
        ImageEncoderConfig(img_size=256)


def test_clip_towers_reproduce_open_clip(tmp_path):
    """ImageEncoder('open_clip:...') and TextEncoder are CLIP's towers: the same numbers for the same weights."""
    torch.manual_seed(0)
    clip, _ = build_clip("clip_tiny_test", image_size=(64, 32))
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    clip.eval()

    image = ImageEncoder("open_clip:clip_tiny_test", img_size=(64, 32), drop_path_rate=0.0, pretrained=str(path))
    text = TextEncoder.from_config(TextEncoderConfig("clip_tiny_test", pretrained=str(path)))
    image.eval(), text.eval()
    assert image.is_open_clip and not image.is_vit and image.embed_dim == 64
    assert image.patch_grid == (4, 2) and image.num_prefix_tokens == 1
    assert (text.embed_dim, text.context_length, text.width) == (64, 77, 64)
    assert not any(k.startswith("model.visual") for k in text.state_dict())  # no visual tower built
    for enc, prefix in ((image, "visual."), (text, "")):
        report = enc.pretrained_report
        assert report.prefix == prefix and sorted(report.loaded) == sorted(enc.model.state_dict())
        assert report.missing == report.unexpected == report.skipped == report.resized == []
    assert "logit_scale" in text.pretrained_report.ignored and "visual.proj" in text.pretrained_report.ignored
    assert "token_embedding.weight" in image.pretrained_report.ignored

    x = torch.randn(3, 3, 64, 32)
    tokens = build_tokenizer("clip_tiny_test")(["a man in a red shirt", "a woman", "a child with a blue bag"])
    with torch.no_grad():
        torch.testing.assert_close(image(x), clip.encode_image(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(text(tokens), clip.encode_text(tokens), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="context_length=77"):
        text(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ConfigError, match="timm CLIP-layout ViT"):
        image.forward_tokens(x)
    with pytest.raises(ConfigError, match="stride_size"):
        ImageEncoder("open_clip:clip_tiny_test", img_size=(64, 32), stride_size=12)


def test_clip_visual_tower_resized_and_model_kwargs(tmp_path):
    src, _ = build_clip("clip_tiny_test", image_size=(224, 224))
    path = tmp_path / "clip224.pt"
    torch.save(src.state_dict(), path)
    enc = ImageEncoder("open_clip:clip_tiny_test", img_size=(384, 128), drop_path_rate=0.0, pretrained=str(path))
    assert enc.patch_grid == (24, 8)
    assert enc.pretrained_report.resized == ["positional_embedding"]
    assert enc.pretrained_report.notes["positional_embedding"] == "grid 14x14 -> 24x8"
    expected = _interpolate_grid(src.visual.positional_embedding.detach()[None], (14, 14), (24, 8))[0]
    torch.testing.assert_close(enc.model.positional_embedding.detach(), expected)

    # model_kwargs = an open_clip model config replacing the named one (TextReID's former `clip_config`).
    cfg = {**CLIP_PRESETS["clip_tiny_test"][0], "embed_dim": 32}
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "layers": 3}
    small = ImageEncoder("open_clip:clip_tiny_test", img_size=(64, 32), drop_path_rate=0.0, model_kwargs=cfg)
    assert small.embed_dim == 32 and len(small.model.transformer.resblocks) == 3
    assert small(torch.randn(2, 3, 64, 32)).shape == (2, 32)


def test_text_encoder_other_context_length_reports_the_position_embedding(tmp_path):
    src, _ = build_clip("clip_tiny_test", image_size=(224, 224))
    path = tmp_path / "clip.pt"
    torch.save(src.state_dict(), path)
    text = TextEncoder("clip_tiny_test", context_length=32, pretrained=str(path))
    report = text.pretrained_report
    assert report.skipped == ["positional_embedding"] and report.missing == []
    assert report.notes["positional_embedding"] == "checkpoint (77, 64) vs model (32, 64)"
    torch.testing.assert_close(text.model.token_embedding.weight, src.token_embedding.weight, rtol=0, atol=0)


def test_clip_open_clip_stochastic_depth_rates():
    enc = ImageEncoder("open_clip:clip_tiny_test", img_size=(64, 32), drop_path_rate=0.5)
    blocks = enc.model.transformer.resblocks
    assert not hasattr(blocks[0].ls_1, "drop_path")  # linear in depth: 0 at the first block
    assert blocks[1].ls_1.drop_path.drop_prob == blocks[1].ls_2.drop_path.drop_prob == 0.5
    assert "model.transformer.resblocks.1.ls_1.drop_path" not in dict(enc.state_dict())  # keys unchanged
    x = torch.randn(4, 3, 64, 32)
    enc.eval()
    reference = enc(x)
    torch.testing.assert_close(enc(x), reference, rtol=0, atol=0)
    enc.train()
    torch.manual_seed(0)
    assert not torch.allclose(enc(x), reference)


def _task_checkpoint(tmp_path, image: ImageEncoder, text: TextEncoder | None, image_key: str, name: str) -> str:
    """A Lightning checkpoint as our tasks write it: the encoder, a momentum copy, heads, a text tower."""
    state = {f"{image_key}.{k}": v for k, v in image.state_dict().items()}
    state.update({f"teacher.module.{k}": torch.full_like(v, 7.0) if v.is_floating_point() else v
                  for k, v in image.state_dict().items()})
    state["teacher.last_step"] = torch.tensor(5)
    state.update({"image_proj.weight": torch.zeros(8, image.embed_dim), "head.classifier.weight": torch.zeros(3, 8)})
    if text is not None:
        state.update({f"text_encoder.{k}": v for k, v in text.state_dict().items()})
    path = tmp_path / name
    torch.save({"state_dict": state, "hyper_parameters": {}}, path)
    return str(path)


@pytest.mark.parametrize("image_key", ["encoder", "image_encoder"])
def test_task_checkpoints_load_the_trained_image_encoder(tmp_path, image_key):
    torch.manual_seed(0)
    src = ImageEncoder("vit_tiny_test", img_size=(64, 32))
    text = TextEncoder("clip_tiny_test", context_length=16) if image_key == "image_encoder" else None
    path = _task_checkpoint(tmp_path, src, text, image_key, "task.ckpt")
    enc = ImageEncoder("vit_tiny_test", img_size=(64, 32), pretrained=path)
    report = enc.pretrained_report
    assert report.prefix == f"{image_key}.model." and not report.missing and not report.unexpected
    assert sorted(report.loaded) == sorted(enc.model.state_dict())
    for key, value in src.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[key], value, rtol=0, atol=0)


def test_text_search_checkpoint_loads_both_clip_towers(tmp_path):
    """A text-search checkpoint (`image_encoder.model.*` open_clip visual, `text_encoder.model.*`) feeds an
    open_clip ImageEncoder, a timm CLIP-layout ViT and a TextEncoder."""
    torch.manual_seed(0)
    image = ImageEncoder("open_clip:clip_tiny_test", img_size=(64, 32), drop_path_rate=0.0).eval()
    text = TextEncoder("clip_tiny_test").eval()
    path = _task_checkpoint(tmp_path, image, text, "image_encoder", "text_reid.ckpt")

    image2 = ImageEncoder("open_clip:clip_tiny_test", img_size=(64, 32), drop_path_rate=0.0, pretrained=path).eval()
    text2 = TextEncoder("clip_tiny_test", pretrained=path).eval()
    timm_vit = _tiny_clip_encoder((64, 32), path).eval()
    assert image2.pretrained_report.prefix == timm_vit.pretrained_report.prefix == "image_encoder.model."
    assert text2.pretrained_report.prefix == "text_encoder.model."
    for enc in (image2, text2, timm_vit):
        assert enc.pretrained_report.missing == enc.pretrained_report.unexpected == []
    x = torch.randn(2, 3, 64, 32)
    tokens = build_tokenizer("clip_tiny_test")(["a man", "a woman with a bag"])
    with torch.no_grad():
        torch.testing.assert_close(image2(x), image(x), rtol=0, atol=0)
        torch.testing.assert_close(text2(tokens), text(tokens), rtol=0, atol=0)
        torch.testing.assert_close(timm_vit(x) @ image.model.proj, image(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="no CLIP visual tower"):
        ImageEncoder("open_clip:clip_tiny_test", img_size=(64, 32),
                     pretrained=_task_checkpoint(tmp_path, ImageEncoder("vit_tiny_test", img_size=(64, 32)), None,
                                                 "encoder", "reid.ckpt"))


# ----------------------------------------------------------------- weights by name, from a local cache
def _hub_file(hf_home, repo: str, filename: str, state: dict) -> None:
    """`state` as `filename` of `repo` in a Hugging Face hub cache under `hf_home` (the layout huggingface_hub
    writes: refs/main names the snapshot that holds the file)."""
    from safetensors.torch import save_file

    folder = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / filename))


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf"


def test_timm_weights_by_name_from_the_hub_cache(hf_home):
    torch.manual_seed(0)
    published = timm.create_model("resnet10t", pretrained=False).state_dict()  # with its 1000-class fc
    _hub_file(hf_home, "timm/resnet10t.c3_in1k", "model.safetensors", published)
    for spec in ("timm:resnet10t.c3_in1k", "timm:resnet10t"):  # without a tag: timm's default tag
        encoder = ImageEncoder("resnet10t", (64, 32), last_stride=2, pretrained=spec)
        report = encoder.pretrained_report
        assert report.path.endswith("model.safetensors") and sorted(report.unexpected) == ["fc.bias", "fc.weight"]
        assert not report.missing and not report.skipped
        assert all(torch.equal(v, published[k]) for k, v in encoder.model.state_dict().items())


def test_open_clip_weights_by_name_from_the_hub_cache(hf_home):
    # The tiny CLIP's weights stored under ViT-B-16/openai's name: what is tested is finding the file offline.
    clip, _ = build_clip("clip_tiny_test", image_size=(64, 32))
    _hub_file(hf_home, "timm/vit_base_patch16_clip_224.openai", "open_clip_model.safetensors", clip.state_dict())
    text = TextEncoder("clip_tiny_test", pretrained="open_clip:ViT-B-16/openai")
    assert not text.pretrained_report.missing
    assert torch.equal(text.model.token_embedding.weight, clip.token_embedding.weight)
    image = ImageEncoder("open_clip:clip_tiny_test", (64, 32), drop_path_rate=0.0,
                         pretrained="open_clip:ViT-B-16/openai")
    assert torch.equal(image.model.conv1.weight, clip.visual.conv1.weight)


def test_weights_missing_from_the_cache_say_what_to_download(hf_home):
    hub = str(hf_home / "hub")
    with pytest.raises(CheckpointError) as err:
        ImageEncoder("vit_tiny_test", (64, 32), pretrained="timm:vit_base_patch16_224.augreg_in21k_ft_in1k")
    message = str(err.value)
    assert "hf download timm/vit_base_patch16_224.augreg_in21k_ft_in1k model.safetensors" in message
    assert hub in message and "never downloads" in message
    with pytest.raises(CheckpointError, match=r"hf download timm/vit_base_patch16_clip_224.openai "
                                              r"open_clip_model.safetensors.*"):
        TextEncoder("clip_tiny_test", pretrained="open_clip:ViT-B-16/openai")
    with pytest.raises(CheckpointError, match=r"Invalid pretrained tag.*timm:resnet10t.c3_in1k"):
        ImageEncoder("resnet10t", (64, 32), pretrained="timm:resnet10t.no_such_tag")
    with pytest.raises(CheckpointError, match=r"open_clip:<model>/<tag>.*open_clip:ViT-B-16/openai"):
        TextEncoder("clip_tiny_test", pretrained="open_clip:ViT-B-16")


# ----------------------------------------------------------------- from-scratch warning
@pytest.mark.parametrize("config, synthetic, warns", [
    (ImageEncoderConfig("vit_base_patch16_224"), False, True),
    (ImageEncoderConfig("resnet50", pretrained="timm:resnet50.tv_in1k"), False, False),
    (ImageEncoderConfig("resnet50"), True, False),
    (ImageEncoderConfig("resnet_tiny_test"), False, False),
    (ImageEncoderConfig("open_clip:clip_tiny_test"), False, False),
    (TextEncoderConfig("ViT-B-16"), False, True),
])
def test_warn_if_untrained(monkeypatch, config, synthetic, warns):
    import warnings

    from pedlightning.models import encoders

    monkeypatch.setattr(encoders, "_warned_untrained", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = encoders.warn_if_untrained(config, "market1501 at data/market1501", synthetic=synthetic)
        again = encoders.warn_if_untrained(config, "market1501 at data/market1501", synthetic=synthetic)
    assert (first, again) == (warns, False)
    assert len(caught) == int(warns)
    if warns:
        text = str(caught[0].message)
        assert f"encoder {config.name!r}" in text and "FROM RANDOM INITIALISATION on market1501 at data/market1501" \
            in text
        assert encoders.SUGGESTED_WEIGHTS[config.name] in text
