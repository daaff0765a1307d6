"""PersonMAE core: masks, region geometry, visible-token encoding, EMA teacher, losses, resume of the schedules."""

import math
import random

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pedlightning.data.transforms.regions import (
    RegionPairTransform,
    region_b_positions,
    sample_crop,
)
from pedlightning.errors import ConfigError
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.models.mae_decoder import (
    LearnedPosEmbed2d,
    RegionDecoder,
    grid_positions,
    sincos_pos_embed_2d,
)
from pedlightning.models.masking import (
    MaskGenerator,
    block_mask,
    forward_visible,
    num_masked_patches,
    visible_indices,
)
from pedlightning.models.momentum import MomentumEncoder, ema_update_, momentum_at
from pedlightning.tasks.personmae import (
    PersonMAEModule,
    hidden_region_b_patches,
    normalize_patches,
    patchify,
    unpatchify,
)
from tests.support.scripted_rng import ScriptedRng

pytestmark = pytest.mark.usefixtures("one_thread")


GRID = (16, 8)  # 256 x 128 input, 16-pixel patches
TINY = dict(encoder=ImageEncoderConfig("vit_tiny_test", (32, 16), drop_path_rate=0.0, model_kwargs={"patch_size": 4}),
            decoder_dim=32, decoder_depth=1, decoder_heads=2, min_block_patches=4)


# ------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("mask_type", ["block", "random"])
@pytest.mark.parametrize("ratio", [0.1, 0.4, 0.5, 0.75, 0.9])
def test_masks_have_exactly_the_requested_ratio(mask_type, ratio):
    gen = MaskGenerator(GRID, ratio, mask_type)
    masks = gen(64, seed=int(ratio * 100))
    expected = int(round(ratio * 128))
    assert masks.shape == (64, 128) and masks.dtype == torch.bool
    assert masks.sum(1).tolist() == [expected] * 64
    assert gen.num_visible == 128 - expected


def test_ratio_rounding_and_bounds():
    assert num_masked_patches(128, 0.75) == 96
    assert num_masked_patches(8, 0.75) == 6
    assert num_masked_patches(10, 0.25) == 2  # round half to even: 2.5 -> 2
    assert num_masked_patches(4, 0.99) == 3  # one patch always stays visible
    with pytest.raises(ValueError, match="mask ratio"):
        MaskGenerator(GRID, 1.0)


def test_block_mask_places_the_drawn_rectangle_on_the_16x8_grid():
    # area 32, aspect (height / width) 2 -> h = round(sqrt(64)) = 8, w = round(sqrt(16)) = 4, at (top 5, left 3)
    rng = ScriptedRng([32.0, math.log(2.0)], [5, 3])
    mask = block_mask(GRID, 32, rng, min_patches=16)
    expected = np.zeros(GRID, dtype=bool)
    expected[5:13, 3:7] = True
    assert np.array_equal(mask, expected)


def test_full_width_blocks_are_allowed():
    # aspect 1/8: h = round(sqrt(8 * 1/8)) = 1, w = round(sqrt(8 * 8)) = 8 = the whole grid width
    rng = ScriptedRng([8.0, math.log(1 / 8)], [15, 0])
    mask = block_mask(GRID, 8, rng, min_patches=4, aspect=(0.1, 10.0))
    assert mask[15].all() and mask.sum() == 8


def _boundary_edges(masks: torch.Tensor) -> torch.Tensor:
    m = masks.view(-1, *GRID)
    return (m[:, 1:] != m[:, :-1]).sum((1, 2)) + (m[:, :, 1:] != m[:, :, :-1]).sum((1, 2))


def test_block_masks_are_compact_and_random_masks_match_the_analytic_boundary():
    n, k = 128, 96
    pairs = 16 * 7 + 15 * 8  # adjacent patch pairs on a 16 x 8 grid
    # a pair straddles the mask boundary with probability 2 * k (n - k) / (n (n - 1)) for a uniform k-subset
    expected_random = pairs * 2 * k * (n - k) / (n * (n - 1))
    random_edges = _boundary_edges(MaskGenerator(GRID, 0.75, "random")(400, seed=1)).float().mean()
    block_edges = _boundary_edges(MaskGenerator(GRID, 0.75, "block")(400, seed=1)).float().mean()
    assert abs(random_edges - expected_random) / expected_random < 0.03
    assert block_edges < 0.5 * expected_random


def test_masks_are_seeded():
    gen = MaskGenerator(GRID, 0.75, "block")
    assert torch.equal(gen(8, seed=[0, 1, 2]), gen(8, seed=[0, 1, 2]))
    assert not torch.equal(gen(8, seed=[0, 1, 2]), gen(8, seed=[0, 1, 3]))
    assert gen(seed=3).shape == (128,)


def test_visible_indices_keep_order():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    assert visible_indices(mask).tolist() == [[1, 3], [0, 1]]
    with pytest.raises(ValueError, match="same number"):
        visible_indices(torch.tensor([[True, False], [False, False]]))


# ------------------------------------------------------------------------------------------------- regions
def test_identity_crop_maps_region_b_onto_itself():
    box = torch.tensor([0.1, 0.2, 0.5, 0.6])
    pos = region_b_positions(box, box, GRID)
    assert torch.allclose(pos, grid_positions(GRID), atol=1e-5)


def test_shifted_and_scaled_crops_map_correctly():
    box_a = torch.tensor([0.0, 0.0, 0.5, 1.0])  # top half of the image
    box_b = torch.tensor([0.25, 0.0, 0.5, 1.0])  # shifted down by half of RegionA's height = 8 patch rows
    pos = region_b_positions(box_a, box_b, GRID).view(*GRID, 2)
    assert torch.allclose(pos[..., 0], torch.arange(16.0).view(16, 1).expand(16, 8) + 8)
    assert torch.allclose(pos[..., 1], torch.arange(8.0).expand(16, 8))
    # RegionB = the left half of RegionA: columns shrink by 2 around RegionA's left edge (-0.5)
    box_b = torch.tensor([0.0, 0.0, 0.5, 0.5])
    pos = region_b_positions(box_a, box_b, GRID).view(*GRID, 2)
    assert torch.allclose(pos[0, :, 1], (torch.arange(8.0) + 0.5) / 2 - 0.5)
    # batched boxes broadcast
    both = region_b_positions(torch.stack([box_a, box_a]), torch.stack([box_a, box_b]), GRID)
    assert both.shape == (2, 128, 2) and torch.allclose(both[0], grid_positions(GRID))


def _gradient_image(width=64, height=128) -> Image.Image:
    """Red grows linearly with x, green with y: a pixel's colour tells where in the source it came from."""
    x = np.linspace(20, 235, width)[None, :].repeat(height, 0)
    y = np.linspace(20, 235, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_region_pixels_agree_with_the_mapped_positions(flip_prob):
    """RegionB's patch colours equal RegionA's colour field at the positions region_b_positions reports."""
    size, patch, grid = (64, 32), 8, (8, 4)
    t = RegionPairTransform(size, scale=(0.3, 0.8), flip_prob=flip_prob, mean=(0, 0, 0), std=(1, 1, 1),
                            rng=random.Random(3))
    for _ in range(5):
        out = t(_gradient_image())
        a, b = out["region_a"], out["region_b"]
        # RegionA is a linear colour field: fit value = c0 + c1 * row + c2 * col in patch units, per channel
        ys, xs = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
        rows, cols = (ys.flatten() + 0.5) / patch - 0.5, (xs.flatten() + 0.5) / patch - 0.5
        design = torch.stack([torch.ones_like(rows), rows, cols], 1).double()
        coef = torch.linalg.lstsq(design, a[:2].flatten(1).T.double()).solution
        pos = region_b_positions(out["box_a"], out["box_b"], grid).double()
        predicted = torch.cat([torch.ones(len(pos), 1, dtype=torch.double), pos], 1) @ coef
        b_means = patchify(b[None, :2], patch)[0].view(-1, patch * patch, 2).mean(1).double()
        assert torch.allclose(predicted, b_means, atol=3 / 255), (predicted - b_means).abs().max()
        # the flip is shared: red grows to the right in both regions, or to the left in both
        sign = 1 if flip_prob == 0 else -1
        assert sign * coef[2, 0] > 0 and sign * (b[0, :, -1].mean() - b[0, :, 0].mean()) > 0


def test_same_region_and_crop_bounds():
    t = RegionPairTransform((32, 16), same_region=True, rng=random.Random(0))
    out = t(_gradient_image())
    assert torch.equal(out["region_a"], out["region_b"]) and torch.equal(out["box_a"], out["box_b"])
    rng = random.Random(1)
    for _ in range(200):
        top, left, h, w = sample_crop(100, 50, (0.4, 1.0), (0.75, 4 / 3), rng)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 50
        assert 0.4 * 5000 * 0.9 <= h * w <= 5000
    with pytest.raises(ValueError, match="scale"):
        RegionPairTransform(scale=(0.0, 1.0))


# ------------------------------------------------------------------------------------------------- decoder
def test_sincos_embedding_matches_the_formula():
    pos = torch.tensor([[2.0, 3.5]])
    emb = sincos_pos_embed_2d(pos, 8)
    omega = torch.tensor([1.0, 10000 ** -0.5])
    expected = torch.cat([torch.sin(2 * omega), torch.cos(2 * omega), torch.sin(3.5 * omega), torch.cos(3.5 * omega)])
    assert torch.allclose(emb[0], expected, atol=1e-6)


def test_learned_embedding_interpolates_between_grid_points():
    pe = LearnedPosEmbed2d((4, 2), 8)
    grid = pe.weight[0].permute(1, 2, 0)  # (4, 2, 8)
    at = pe(torch.tensor([[[1.0, 0.0], [1.5, 0.5], [9.0, -3.0]]]))
    assert torch.allclose(at[0, 0], grid[1, 0], atol=1e-6)
    assert torch.allclose(at[0, 1], grid[1:3, 0:2].mean((0, 1)), atol=1e-6)
    assert torch.allclose(at[0, 2], grid[3, 0], atol=1e-6)  # clamped at the border


def test_decoder_output_shape_and_query_permutation_equivariance():
    dec = RegionDecoder(16, 12, (4, 2), decoder_dim=16, depth=1, num_heads=2).eval()
    tokens = torch.randn(2, 1 + 3, 16)
    vis = grid_positions((4, 2))[:3].expand(2, -1, -1)
    q = torch.rand(2, 8, 2) * 3
    out = dec(tokens, vis, q)
    assert out.shape == (2, 8, 12)
    # queries are a set: permuting them permutes the predictions
    perm = torch.randperm(8)
    assert torch.allclose(dec(tokens, vis, q[:, perm]), out[:, perm], atol=1e-5)


# ------------------------------------------------------------------------------------------------- encoder
def test_encoder_sees_only_the_visible_tokens():
    model = PersonMAEModule(**TINY, mask_ratio=0.75).eval()
    seen = []
    model.encoder.model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    batch = _batch(3)
    mask = model.draw_masks(3, 0)
    model.compute_losses(batch, mask)
    assert model.grid == (8, 4) and mask.sum(1).tolist() == [24] * 3
    assert seen == [(3, 1 + 8, 64)]  # CLS + 32 - 24 visible patches (the teacher runs on RegionB, no hook)


def test_visible_encoding_ignores_masked_pixels_and_equals_the_full_forward_without_mask():
    model = PersonMAEModule(**TINY).eval()
    vit = model.encoder.model
    images = torch.randn(2, 3, 32, 16)
    keep_all = torch.arange(32).expand(2, -1)
    assert torch.allclose(forward_visible(vit, images, keep_all), vit.forward_features(images), atol=1e-5)
    mask = model.masks(2, seed=0)
    keep = visible_indices(mask)
    pixels = patchify(images, 4)
    noisy = unpatchify(torch.where(mask.unsqueeze(-1), torch.randn_like(pixels), pixels), 4, (8, 4))
    assert torch.allclose(forward_visible(vit, images, keep), forward_visible(vit, noisy, keep), atol=1e-6)


def test_encoder_pos_embed_is_fixed_sincos():
    model = PersonMAEModule(**TINY)
    pe = model.encoder.model.pos_embed
    assert not pe.requires_grad and torch.equal(pe[0, 0], torch.zeros(64))
    assert torch.allclose(pe[0, 1:], sincos_pos_embed_2d(grid_positions((8, 4)), 64))
    assert all(p is not pe for p in model.optimized_modules().parameters() if p.requires_grad)


def test_patchify_roundtrip_and_patch_normalisation():
    x = torch.randn(2, 3, 32, 16)
    p = patchify(x, 4)
    assert p.shape == (2, 32, 48) and torch.equal(unpatchify(p, 4, (8, 4)), x)
    assert torch.equal(p[0, 5], x[0, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))  # patch (1, 1), row-major
    n = normalize_patches(p)
    assert torch.allclose(n.mean(-1), torch.zeros(2, 32), atol=1e-5)
    assert torch.allclose(n.std(-1), torch.ones(2, 32), atol=1e-3)


# ------------------------------------------------------------------------------------------------- EMA
def test_momentum_schedule_values():
    assert momentum_at(0, 100) == pytest.approx(0.999)
    assert momentum_at(50, 100) == pytest.approx((0.999 + 0.9999) / 2)
    assert momentum_at(100, 100) == pytest.approx(0.9999)
    assert momentum_at(250, 100) == pytest.approx(0.9999)
    assert momentum_at(25, 100) == pytest.approx(0.9999 - 0.0009 * (math.cos(math.pi / 4) + 1) / 2)
    assert momentum_at(60, 100, 0.99, schedule="constant") == 0.99


def test_ema_update_math():
    student = torch.nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.fill_(3.0)
        student.bias.fill_(-1.0)
    teacher = MomentumEncoder(student).module
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        teacher.bias.fill_(1.0)
    ema_update_(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    for _ in range(9):
        ema_update_(teacher, student, 0.9)
    # t_k = s + (t_0 - s) m^k with a fixed student
    assert torch.allclose(teacher.weight, torch.full((1, 2), 3 + (1 - 3) * 0.9 ** 10), atol=1e-6)
    assert torch.allclose(teacher.bias, torch.full((1,), -1 + (1 + 1) * 0.9 ** 10), atol=1e-6)


# ------------------------------------------------------------------------------------------------- training
def _batch(n: int, seed: int = 0, size=(32, 16)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    boxes_a = torch.tensor([[0.0, 0.0, 0.8, 0.9]]).expand(n, -1)
    boxes_b = torch.tensor([[0.2, 0.1, 0.8, 0.9]]).expand(n, -1)
    return {"region_a": torch.randn(n, 3, *size, generator=g), "region_b": torch.randn(n, 3, *size, generator=g),
            "box_a": boxes_a.clone(), "box_b": boxes_b.clone()}


class FixedBatches(Dataset):
    def __init__(self, n: int):
        self.data = _batch(n, seed=1)

    def __len__(self):
        return len(self.data["region_a"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.data.items()}


def _smooth_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two overlapping crops (RegionB shifted by a quarter) of smooth random images, with their boxes."""
    g = torch.Generator().manual_seed(seed)
    images = F.interpolate(torch.randn(n, 3, 8, 4, generator=g), size=(40, 20), mode="bilinear")
    box_a = torch.tensor([[0.0, 0.0, 0.8, 0.8]]).expand(n, -1).clone()
    box_b = torch.tensor([[0.2, 0.2, 0.8, 0.8]]).expand(n, -1).clone()
    return {"region_a": images[..., :32, :16].contiguous(), "region_b": images[..., 8:, 4:].contiguous(),
            "box_a": box_a, "box_b": box_b}


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = PersonMAEModule(**TINY, feat_weight_warmup_epochs=0.0)
    batch, mask = _smooth_batch(8), model.masks(8, seed=0)
    opt = torch.optim.AdamW([p for p in model.optimized_modules().parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(160):
        losses = model.compute_losses(batch, mask)
        history.append({k: float(v.detach()) for k, v in losses.items()})
        opt.zero_grad()
        (losses["pixel"] + losses["feature"]).backward()
        opt.step()
    first, last = history[0], history[-1]
    # both targets have zero mean and unit variance per patch / token: predicting 0 scores 1.0 on either loss
    assert last["pixel"] < 0.7 and last["feature"] < 0.5
    assert last["pixel"] < 0.35 * first["pixel"] and last["feature"] < 0.35 * first["feature"]


@pytest.mark.parametrize("loss_type,separate", [("pixel", True), ("feature", True), ("pixel_feature", False)])
def test_ablation_switches_build_only_what_they_need(loss_type, separate):
    model = PersonMAEModule(**TINY, loss_type=loss_type, separate_decoders=separate)
    losses = model.compute_losses(_batch(2), model.masks(2, seed=0))
    assert set(losses) == ({"pixel", "feature"} if loss_type == "pixel_feature" else {loss_type})
    assert (model.teacher is None) == (loss_type == "pixel")
    assert set(model.decoders) == ({"shared"} if not separate else {loss_type})


class StopAfterEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.should_stop = True


class TeacherRecorder(L.Callback):
    """Teacher and student weights at the start of every batch (the EMA of the previous step is done)."""

    def __init__(self):
        self.states = []

    def _record(self, trainer, pl_module):
        pick = lambda enc: enc.model.blocks[0].attn.qkv.weight.detach().clone()  # noqa: E731
        self.states.append((trainer.global_step, pick(pl_module.teacher.module), pick(pl_module.encoder)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._record(trainer, pl_module)


class LoggedPersonMAE(PersonMAEModule):
    """Keeps every logged value with the step it was logged at."""

    def log(self, name, value, *args, **kwargs):
        self.__dict__.setdefault("logged", []).append((self.global_step, name, float(torch.as_tensor(value).detach())))
        super().log(name, value, *args, **kwargs)


def _fit(tmp_path, name, callbacks, ckpt_path=None):
    torch.manual_seed(0)
    model = LoggedPersonMAE(**TINY, feat_weight_warmup_epochs=1.5, teacher_momentum=0.5,
                            teacher_momentum_final=0.9, warmup_epochs=0.5)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ckpt, *callbacks])
    trainer.fit(model, DataLoader(FixedBatches(12), batch_size=4), ckpt_path=ckpt_path)
    return model, trainer


def test_schedules_follow_the_step_and_resume_continues_them_exactly(tmp_path):
    rec = TeacherRecorder()
    straight, trainer = _fit(tmp_path, "a", [rec])
    assert trainer.estimated_stepping_batches == 6
    logged = straight.logged
    # w_feat ramps over 1.5 epochs = 4.5 steps, used at the step before the optimizer step
    assert [v for s, k, v in logged if k == "train/feat_weight"] == pytest.approx(
        [0, 1 / 4.5, 2 / 4.5, 3 / 4.5, 4 / 4.5, 1.0])
    momenta = [(s, v) for s, k, v in logged if k == "train/teacher_momentum"]
    assert momenta == [(s, pytest.approx(momentum_at(s, 6, 0.5, 0.9))) for s in range(1, 7)]
    # the teacher moved by exactly one EMA step per optimizer step, with the scheduled momentum
    assert [s for s, _, _ in rec.states] == list(range(7))
    for (_, t0, _), (step, t1, s1) in zip(rec.states, rec.states[1:]):
        m = momentum_at(step, 6, 0.5, 0.9)
        assert torch.allclose(t1, m * t0 + (1 - m) * s1, atol=1e-6)
    assert not torch.allclose(rec.states[-1][1], rec.states[0][1])

    _fit(tmp_path, "b", [StopAfterEpoch()])
    resumed, _ = _fit(tmp_path, "b", [], ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert [v for s, k, v in resumed.logged if k == "train/feat_weight"] == pytest.approx([3 / 4.5, 4 / 4.5, 1.0])
    for name, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[name], atol=1e-6), name


# ------------------------------------------------------------------------------------------------- targets
def _last_block_and_final_tokens(vit, images):
    """The teacher's tokens by timm's own forward, the last block's output read by a hook: (before, after) norm."""
    seen = []
    handle = vit.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o))
    after = vit.forward_features(images)
    handle.remove()
    return seen[0], after


def _layer_norm(x):
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()


@pytest.mark.parametrize("feat_layer", ["last_block", "final_norm"])
@pytest.mark.parametrize("feat_norm", ["both", "target", "none"])
def test_feature_target_and_prediction_follow_the_options(feat_layer, feat_norm):
    torch.manual_seed(0)
    model = PersonMAEModule(**TINY, feat_layer=feat_layer, feat_norm=feat_norm).eval()
    with torch.no_grad():  # a teacher that differs from the student, with a non-trivial final norm
        for p in model.teacher.module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = _batch(2)
    before, after = _last_block_and_final_tokens(model.teacher.module.model, batch["region_b"])
    tokens = (before if feat_layer == "last_block" else after)[:, 1:]
    expected = tokens if feat_norm == "none" else _layer_norm(tokens)
    assert not torch.allclose(before, after, atol=1e-2)
    assert torch.allclose(model.feature_target(batch["region_b"]), expected, atol=1e-5)
    pred = 3 * torch.randn(2, 32, 64) + 1
    assert torch.allclose(model.feature_prediction(pred), _layer_norm(pred) if feat_norm == "both" else pred,
                          atol=1e-5)
    # the loss compares exactly these two tensors
    mask = model.masks(2, seed=0)
    out = model.predict_region_b(batch, mask)["feature"]
    loss = model.compute_losses(batch, mask)["feature"]
    assert torch.allclose(loss, (model.feature_prediction(out) - expected).pow(2).mean(), atol=1e-5)


def test_defaults_are_bootmae_targets_capped_blocks_and_no_drop_path():
    import inspect

    import yaml

    params = inspect.signature(PersonMAEModule).parameters
    assert params["feat_layer"].default == "last_block" and params["feat_norm"].default == "both"
    assert params["max_block_patches"].default == 60 and params["loss_patches"].default == "all"
    assert params["encoder"].default.drop_path_rate == 0.0
    for name in ("pretrain_luperson.yaml", "demo_pretrain_synthetic.yaml"):
        with open(f"configs/personmae/{name}") as f:
            args = yaml.safe_load(f)["model"]["init_args"]
        assert args["encoder"]["drop_path_rate"] == 0.0 and args["max_block_patches"] == 60, name


# ------------------------------------------------------------------------------------------------- loss patches
def test_hidden_patches_are_the_masked_ones_or_outside_region_a():
    mask = MaskGenerator((8, 4), 0.5, "random")(2, seed=4)
    box_a = torch.tensor([[0.0, 0.0, 0.5, 1.0]]).expand(2, -1)
    # same region: hidden = masked
    pos = region_b_positions(box_a, box_a, (8, 4))
    assert torch.equal(hidden_region_b_patches(mask, pos, (8, 4)), mask)
    # RegionB shifted down by a quarter of RegionA = 2 patch rows: B's (r, c) sits on A's (r + 2, c)
    box_b = torch.tensor([[0.125, 0.0, 0.5, 1.0]]).expand(2, -1)
    pos = region_b_positions(box_a, box_b, (8, 4))
    grid_mask = mask.view(2, 8, 4)
    expected = torch.ones(2, 8, 4, dtype=torch.bool)  # rows 6, 7 of B lie below RegionA: hidden
    expected[:, :6] = grid_mask[:, 2:]
    assert torch.equal(hidden_region_b_patches(mask, pos, (8, 4)), expected.view(2, 32))


@pytest.mark.parametrize("same", [True, False])
def test_masked_loss_counts_exactly_the_hidden_patches(same):
    torch.manual_seed(0)
    model = PersonMAEModule(**TINY, loss_patches="masked", feat_weight_warmup_epochs=0.0).eval()
    batch = _batch(3)
    if same:
        batch["box_b"] = batch["box_a"].clone()
    mask = model.masks(3, seed=2)
    with torch.no_grad():
        preds = model.predict_region_b(batch, mask)
        losses = model.compute_losses(batch, mask)
    hidden = hidden_region_b_patches(mask, region_b_positions(batch["box_a"], batch["box_b"], model.grid), model.grid)
    assert torch.equal(hidden, mask) == same and 0 < hidden.sum() < hidden.numel()
    pixel_err = (preds["pixel"] - model.pixel_target(batch["region_b"])).pow(2).mean(-1)
    feat_err = (model.feature_prediction(preds["feature"]) - model.feature_target(batch["region_b"])).pow(2).mean(-1)
    for name, err in (("pixel", pixel_err), ("feature", feat_err)):
        expected = sum(float(err[b, i]) for b in range(3) for i in range(32) if hidden[b, i]) / int(hidden.sum())
        assert float(losses[name]) == pytest.approx(expected, rel=1e-6)
        assert abs(float(losses[name]) - float(err.mean())) > 1e-4  # not the all-patch mean
    everything = PersonMAEModule(**TINY, loss_patches="all").eval()
    everything.load_state_dict(model.state_dict())
    assert float(everything.compute_losses(batch, mask)["pixel"]) == pytest.approx(float(pixel_err.mean()), rel=1e-5)


def test_same_region_with_the_whole_region_b_loss_is_refused():
    batch = _batch(2)
    batch["box_b"] = batch["box_a"].clone()
    model = PersonMAEModule(**TINY, loss_patches="all")
    with pytest.raises(ConfigError, match="loss_patches"):
        model.training_step(batch, 0)
    masked = PersonMAEModule(**TINY, loss_patches="masked")
    assert torch.isfinite(masked.training_step(batch, 0))
    with pytest.raises(ConfigError, match="loss_patches"):
        PersonMAEModule(**TINY, loss_patches="visible")


# ------------------------------------------------------------------------------------------------- decoder inputs
def test_query_scale_starts_as_a_no_op_and_carries_region_b_scale():
    torch.manual_seed(0)
    plain = RegionDecoder(16, 12, (4, 2), decoder_dim=16, depth=1, num_heads=2).eval()
    scaled = RegionDecoder(16, 12, (4, 2), decoder_dim=16, depth=1, num_heads=2, query_scale=True).eval()
    scaled.load_state_dict(plain.state_dict(), strict=False)
    tokens, vis = torch.randn(2, 4, 16), grid_positions((4, 2))[:3].expand(2, -1, -1)
    q, scale = torch.rand(2, 8, 2) * 3, torch.tensor([[0.5, 2.0], [1.0, 1.0]])
    assert torch.allclose(scaled(tokens, vis, q, scale), plain(tokens, vis, q), atol=1e-6)
    with torch.no_grad():
        scaled.scale_embed.weight.normal_()
    out = scaled(tokens, vis, q, scale)
    assert not torch.allclose(out[0], plain(tokens, vis, q)[0], atol=1e-3)
    assert torch.allclose(out[1], plain(tokens, vis, q)[1], atol=1e-6)  # log(1) = 0: unchanged
    with pytest.raises(ValueError, match="query_scale"):
        scaled(tokens, vis, q)
    # the module passes RegionB's box size over RegionA's
    model = PersonMAEModule(**TINY).eval()
    seen = []
    model.decoders["pixel"].scale_embed.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    batch = _batch(2)
    model.predict_region_b(batch, model.masks(2, seed=0))
    assert torch.allclose(seen[0], torch.log(batch["box_b"][:, 2:] / batch["box_a"][:, 2:]))


def test_decoder_query_token_gets_no_weight_decay():
    from pedlightning.optim import param_groups

    model = PersonMAEModule(**TINY)
    decay_of = {id(p): g["weight_decay"] for g in param_groups(model.optimized_modules(), 0.05) for p in g["params"]}
    assert [decay_of[id(model.decoders[k].mask_token)] for k in model.decoders] == [0.0, 0.0]
    assert decay_of[id(model.decoders["pixel"].head.weight)] == 0.05
