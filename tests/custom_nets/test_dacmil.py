"""Tests of the DA-CMIL network: shapes per pooling variant, padding, TorchScript, weights loading, gradients."""

from __future__ import annotations

import io

import pytest
import torch
from monai.networks.nets.resnet import ResNet, ResNetBlock

from custom_nets.dacmil import DACMIL, DACMIL_POOLINGS

POOLINGS = list(DACMIL_POOLINGS)
SIZE = 64  # 64 px in, 2x2 feature maps out (stride 32)
MAP = SIZE // 32

# (pooling, batch of bags, bag size, num_classes)
SHAPE_CASES = [(p, b, n, k) for p in POOLINGS for (b, n, k) in [(1, 1, 2), (2, 3, 2), (1, 4, 3)]]

_NETS: dict[tuple, DACMIL] = {}


def _net(pooling: str, num_classes: int = 2, **kwargs) -> DACMIL:
    """A small eval-mode network, built once per configuration (construction dominates the test time)."""
    key = (pooling, num_classes, tuple(sorted(kwargs.items())))
    if key not in _NETS:
        torch.manual_seed(0)
        _NETS[key] = DACMIL(backbone="resnet10", pooling=pooling, num_classes=num_classes, **kwargs).eval()
    return _NETS[key]


@pytest.mark.parametrize("pooling, batch, bag_size, num_classes", SHAPE_CASES)
def test_shapes(pooling, batch, bag_size, num_classes):
    net = _net(pooling, num_classes)
    x = torch.randn(batch, bag_size, 1, SIZE, SIZE)
    with torch.no_grad():
        out = net.forward_features(x)
        logits = net(x)
    assert logits.shape == (batch, num_classes)
    torch.testing.assert_close(out["logits"], logits)
    assert out["bag_features"].shape == (batch, 512)
    assert out["instance_features"].shape == (batch, bag_size, 512)
    assert out["instance_weights"].shape == (batch, bag_size)
    assert out["instance_logits"].shape == (batch, bag_size, num_classes)
    assert out["spatial_attention"].shape == (batch, bag_size, MAP, MAP)
    assert out["mask"].shape == (batch, bag_size) and out["mask"].all()
    torch.testing.assert_close(out["instance_weights"].sum(1), torch.ones(batch))
    torch.testing.assert_close(out["spatial_attention"].sum((2, 3)), torch.ones(batch, bag_size))


@pytest.mark.parametrize("pooling", POOLINGS)
def test_padded_batch_equals_bags_alone(pooling):
    net = _net(pooling)
    torch.manual_seed(1)
    bag_a, bag_b = torch.randn(4, 1, SIZE, SIZE), torch.randn(2, 1, SIZE, SIZE)
    x = torch.zeros(2, 4, 1, SIZE, SIZE)
    x[0], x[1, :2] = bag_a, bag_b
    x[1, 2:] = 5.0  # padding content must not matter
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    with torch.no_grad():
        out = net.forward_features(x, mask)
        alone = net.forward_features(bag_b.unsqueeze(0))
    for key in ("logits", "bag_features"):
        torch.testing.assert_close(out[key][1:], alone[key], rtol=1e-4, atol=1e-5)
    for key in ("instance_features", "instance_weights", "spatial_attention", "instance_logits"):
        torch.testing.assert_close(out[key][1:, :2], alone[key], rtol=1e-4, atol=1e-5)
    assert (out["instance_weights"][1, 2:] == 0).all()
    assert (out["spatial_attention"][1, 2:] == 0).all()
    assert (out["instance_features"][1, 2:] == 0).all()
    torch.testing.assert_close(out["instance_weights"].sum(1), torch.ones(2))


def test_instance_chunking_gives_same_outputs():
    torch.manual_seed(0)
    net = DACMIL(backbone="resnet10", pooling="dual").eval()
    chunked = DACMIL(backbone="resnet10", pooling="dual", instance_chunk_size=2).eval()
    chunked.load_state_dict(net.state_dict())
    x = torch.randn(1, 5, 1, SIZE, SIZE)
    mask = torch.tensor([[True, True, True, True, False]])
    with torch.no_grad():
        a, b = net.forward_features(x, mask), chunked.forward_features(x, mask)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_max_pooling_picks_top_instance():
    net = _net("max")
    x = torch.randn(2, 3, 1, SIZE, SIZE)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    with torch.no_grad():
        out = net.forward_features(x, mask)
    probability = torch.softmax(out["instance_logits"], dim=-1)[..., 1].masked_fill(~mask, -1.0)
    top = probability.argmax(dim=1)
    for b in range(2):
        torch.testing.assert_close(out["logits"][b], out["instance_logits"][b, top[b]])
        torch.testing.assert_close(out["bag_features"][b], out["instance_features"][b, top[b]])
        assert out["instance_weights"][b, top[b]] == 1 and out["instance_weights"][b].sum() == 1


def test_mean_pooling_is_mean_of_real_instances():
    net = _net("mean")
    x = torch.randn(1, 3, 1, SIZE, SIZE)
    mask = torch.tensor([[True, False, True]])
    with torch.no_grad():
        out = net.forward_features(x, mask)
    expected = out["instance_features"][0, [0, 2]].mean(0)
    torch.testing.assert_close(out["bag_features"][0], expected)


@pytest.mark.parametrize("pooling", ["dual", "max"])
def test_gradients_reach_backbone_and_attention(pooling):
    torch.manual_seed(0)
    net = DACMIL(backbone="resnet10", pooling=pooling).train()
    x = torch.randn(2, 2, 1, SIZE, SIZE)
    out = net.forward_features(x)
    torch.nn.functional.cross_entropy(out["logits"], torch.tensor([0, 1])).backward()
    assert net.backbone.conv1.weight.grad is not None and net.backbone.conv1.weight.grad.abs().sum() > 0
    assert net.classifier.weight.grad.abs().sum() > 0
    if pooling == "dual":
        for module in (net.spatial_pool, net.instance_attention):
            for name, p in module.named_parameters():
                if name == "attention_w.bias":  # softmax is shift-invariant: this bias gets no gradient
                    continue
                assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_param_groups_split():
    net = _net("dual")
    groups = net.param_groups(backbone_lr=1e-4, head_lr=1e-3)
    assert [g["lr"] for g in groups] == [1e-4, 1e-3]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    assert {id(p) for p in net.backbone.parameters()} == {id(p) for p in groups[0]["params"]}
    torch.optim.Adam(groups)  # accepted by an optimizer as is
    with pytest.raises(ValueError, match="head_lr"):
        net.param_groups(head_lr=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
# "attention" differs from "dual" only by the average pooling, which "max" and "mean" cover: spared for time.
@pytest.mark.parametrize("pooling", ["dual", "max", "mean"])
def test_torchscript_script_round_trip(pooling):
    net = _net(pooling)
    x = torch.randn(2, 3, 1, SIZE, SIZE)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    scripted = torch.jit.script(net)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        expected = net(x, mask)
        torch.testing.assert_close(loaded(x, mask), expected)
        torch.testing.assert_close(loaded(x[:1]), net(x[:1]))
        features = loaded.forward_features(x, mask)
        torch.testing.assert_close(features["instance_weights"], net.forward_features(x, mask)["instance_weights"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_trace_round_trip():
    net = _net("dual")
    x = torch.randn(1, 3, 1, SIZE, SIZE)
    with torch.no_grad():
        traced = torch.jit.trace(net, x, check_trace=False)  # checked below, after a save/load
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_resnet34_feature_map_is_8x8_at_256():
    torch.manual_seed(0)
    net = DACMIL(backbone="resnet34").eval()
    with torch.no_grad():
        out = net.forward_features(torch.randn(1, 1, 1, 256, 256))
    assert out["spatial_attention"].shape == (1, 1, 8, 8)
    assert out["instance_features"].shape == (1, 1, 512)
    with torch.no_grad():
        assert net.backbone(torch.randn(1, 1, 256, 256)).shape == (1, 512, 8, 8)


def test_resnet50_feature_dim():
    net = DACMIL(backbone="resnet50", pooling="mean")
    assert net.feature_dim == 2048 and net.classifier.in_features == 2048


def test_pretrained_path_loads_monai_resnet(tmp_path):
    torch.manual_seed(3)
    resnet = ResNet(ResNetBlock, [1, 1, 1, 1], [64, 128, 256, 512], spatial_dims=2, n_input_channels=1, num_classes=7)
    path = tmp_path / "resnet10.pt"
    torch.save({"state_dict": resnet.state_dict()}, path)  # with fc.* keys and a wrapper
    net = DACMIL(backbone="resnet10", pretrained_path=str(path))
    torch.testing.assert_close(net.backbone.conv1.weight, resnet.conv1.weight)
    torch.testing.assert_close(net.backbone.layer4[0].conv2.weight, resnet.layer4[0].conv2.weight)

    # A whole DACMIL state dict (with DDP prefix) also works: only its backbone is taken.
    other = DACMIL(backbone="resnet10")
    whole = tmp_path / "dacmil.pt"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, whole)
    other.load_backbone_weights(whole)
    torch.testing.assert_close(other.backbone.conv1.weight, resnet.conv1.weight)


def test_pretrained_path_errors(tmp_path):
    no_backbone = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, no_backbone)
    with pytest.raises(ValueError, match="no resnet10 backbone keys"):
        DACMIL(backbone="resnet10", pretrained_path=no_backbone)
    partial = tmp_path / "partial.pt"
    state = DACMIL(backbone="resnet10").backbone.state_dict()
    state.pop("layer4.0.conv1.weight")
    torch.save(state, partial)
    with pytest.raises(ValueError, match="layer4.0.conv1.weight"):
        DACMIL(backbone="resnet10", pretrained_path=partial)
    wrong_depth = tmp_path / "resnet18.pt"
    torch.save(DACMIL(backbone="resnet18").backbone.state_dict(), wrong_depth)
    with pytest.raises(ValueError, match="unexpected keys"):
        DACMIL(backbone="resnet10", pretrained_path=wrong_depth)
    with pytest.raises(FileNotFoundError):
        DACMIL(backbone="resnet10", pretrained_path=tmp_path / "missing.pt")


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"pooling": "gcp"}, "gcp"),
        ({"backbone": "vgg16"}, "vgg16"),
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": -1}, "in_channels"),
        ({"attention_hidden": 0}, "attention_hidden"),
        ({"instance_chunk_size": 0}, "instance_chunk_size"),
        ({"spatial_normalization": "relu"}, "relu"),
        ({"pooling": "mean", "spatial_normalization": "tanh"}, "tanh"),
    ],
)
def test_ill_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        DACMIL(**{"backbone": "resnet10", **kwargs})


def test_ill_inputs():
    net = _net("dual")
    with pytest.raises(ValueError, match="4 dimensions"):
        net(torch.randn(2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="mask shape"):
        net(torch.randn(1, 2, 1, SIZE, SIZE), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one real instance"):
        net(torch.randn(2, 2, 1, SIZE, SIZE), torch.tensor([[True, False], [False, False]]))


def test_group_norm_decouples_bags_in_training():
    """With group norm a bag's training-mode output does not depend on the other bags of the batch (batch norm's
    does), and no batch-norm layer is left in the backbone."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 1, 64, 64)
    outputs = {}
    for norm in ("batch", ("group", {"num_groups": 32})):
        net = DACMIL(backbone="resnet10", pooling="dual", norm=norm).train()
        alone = net(x[:1])
        together = net(torch.cat([x[:1], x[1:] * 3.0]))[:1]
        outputs[str(norm)] = bool(torch.allclose(alone, together, atol=1e-5))
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.backbone.modules())
        assert has_bn == (norm == "batch")
    assert outputs == {"batch": False, str(("group", {"num_groups": 32})): True}
