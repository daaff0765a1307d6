"""MGN head: branch layout and shapes, stripe pooling, losses, and pretrained weights in every branch."""

import pytest
import torch
import torch.nn.functional as F

from pedlightning.errors import ConfigError
from pedlightning.losses import TripletLoss
from pedlightning.models.encoders import ImageEncoder
from pedlightning.models.mgn import MGN, mgn_losses

# resnet10t with two blocks in layer3, so each branch really copies layer3[1:] (not an empty stage)
KWARGS = {"layers": [1, 1, 2, 1]}
SIZE = (64, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def _encoder(last_stride: int = 2, pretrained: str | None = None) -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder("resnet_tiny_test", SIZE, drop_path_rate=0.0, last_stride=last_stride,
                        pretrained=pretrained, model_kwargs=KWARGS)


@pytest.fixture(scope="module")
def mgn() -> MGN:
    torch.manual_seed(1)
    return MGN(_encoder(), num_classes=5, reduction_dim=16)


def test_branch_outputs_and_shapes(mgn):
    images = torch.randn(4, 3, *SIZE)
    out = mgn.forward_train(images)
    assert mgn.num_features == 8 and mgn.embed_dim == 128
    assert [tuple(t.shape) for t in out["logits"]] == [(4, 5)] * 8
    assert [tuple(t.shape) for t in out["triplet_feats"]] == [(4, 16)] * 3
    assert [tuple(t.shape) for t in out["bn_feats"]] == [(4, 16)] * 8
    mgn.eval()
    try:
        out = mgn.forward_train(images)
        assert torch.allclose(mgn(images), torch.cat(out["bn_feats"], dim=1))
    finally:
        mgn.train()


def test_part_branches_have_stride_1_and_pool_stripes(mgn):
    images = torch.randn(2, 3, *SIZE)
    m = mgn.encoder.model
    shared = mgn._trunk(images)
    global_map = m.layer4(m.layer3[1:](shared))
    part_map = mgn.part_branches[1](shared)
    # 64x32 input: layer3 at stride 16 (4x2), the global layer4 at stride 32 (2x1), part layer4 at stride 16 (4x2)
    assert global_map.shape[-2:] == (2, 1) and part_map.shape[-2:] == (4, 2)
    feats = mgn._pooled(images)
    assert len(feats) == 8
    assert torch.allclose(feats[0], global_map.amax(dim=(2, 3)))
    assert torch.allclose(feats[4], part_map.amax(dim=(2, 3)))
    # 4 rows into 3 adaptive bins: rows [0, 2), [1, 3), [2, 4)
    for i, (start, stop) in enumerate([(0, 2), (1, 3), (2, 4)]):
        assert torch.allclose(feats[5 + i], part_map[:, :, start:stop].amax(dim=(2, 3)))
    two = mgn.part_branches[0](shared)
    assert torch.allclose(feats[2], two[:, :, :2].amax(dim=(2, 3)))
    assert torch.allclose(feats[3], two[:, :, 2:].amax(dim=(2, 3)))


def test_losses_are_the_means_over_heads(mgn):
    torch.manual_seed(3)
    images, pids = torch.randn(4, 3, *SIZE), torch.tensor([0, 0, 1, 1])
    out = mgn.forward_train(images)
    triplet = TripletLoss(margin=0.3)
    id_loss, tri_loss = mgn_losses(out, pids, triplet, label_smoothing=0.1)
    expected_id = sum(F.cross_entropy(t, pids, label_smoothing=0.1) for t in out["logits"]) / 8
    assert torch.allclose(id_loss, expected_id)
    # batch-hard by hand on each of the 3 global features
    expected_tri = 0.0
    for f in out["triplet_feats"]:
        d = torch.cdist(f.double(), f.double())
        ap = torch.stack([d[0, 1], d[1, 0], d[2, 3], d[3, 2]])
        an = torch.stack([d[i, [j for j in range(4) if pids[j] != pids[i]]].min() for i in range(4)])
        expected_tri += torch.relu(ap - an + 0.3).mean() / 3
    assert float(tri_loss.detach()) == pytest.approx(float(expected_tri.detach()), rel=1e-4)


def test_a_pretrained_resnet_initialises_every_branch(tmp_path):
    source = _encoder(last_stride=2).model
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    # a VAL-PAT-style Lightning checkpoint: student encoder, momentum key encoder, projection
    ckpt = {"state_dict": {**{f"encoder.model.{k}": v for k, v in weights.items()},
                           **{f"key_encoder.module.encoder.model.{k}": v + 1 for k, v in weights.items()},
                           "projection.net.0.weight": torch.zeros(3, 3)}}
    path = tmp_path / "valpat.ckpt"
    torch.save(ckpt, path)
    encoder = _encoder(last_stride=1, pretrained=str(path))
    report = encoder.pretrained_report
    assert report.prefix == "encoder.model." and set(report.loaded) == set(weights) and not report.missing
    mgn = MGN(encoder, num_classes=3, reduction_dim=8)
    for key, value in weights.items():
        assert torch.equal(encoder.model.state_dict()[key], value), key
    covered = 0
    for branch in mgn.part_branches:
        for key, value in branch.state_dict().items():
            stage, rest = key.split(".", 1)
            source_key = f"layer3.{rest}" if stage == "0" else f"layer4.{rest}"
            assert torch.equal(value, weights[source_key]), key
            covered += 1
    branch_keys = [k for k in weights if k.startswith("layer4.") or (k.startswith("layer3.") and
                                                                      not k.startswith("layer3.0."))]
    assert covered == 2 * len(branch_keys) and len(branch_keys) > 20
    # the part branches are copies: training one leaves the encoder's (global branch) layers alone
    with torch.no_grad():
        mgn.part_branches[0][1][0].conv1.weight.add_(1.0)
    assert torch.equal(encoder.model.layer4[0].conv1.weight, weights["layer4.0.conv1.weight"])


def test_a_vit_encoder_is_refused():
    vit = ImageEncoder("vit_tiny_test", (32, 16), model_kwargs={"patch_size": 8}, drop_path_rate=0.0)
    with pytest.raises(ConfigError, match="ResNet-style"):
        MGN(vit, num_classes=3)
