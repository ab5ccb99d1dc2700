"""M2UNet: output shapes, task variants, padding masks, Table I parameter counts, TorchScript, ill arguments."""

from __future__ import annotations

import pytest
import torch

from custom_nets.m2unet import M2UNet

# A narrow network keeps the CPU tests fast; the full-size one is built where its sizes matter.
SMALL = {"features": 8, "bottleneck_features": 16, "emb_concepts": 12, "img_concepts": 6}


def _small(**kwargs) -> M2UNet:
    torch.manual_seed(0)
    return M2UNet(**{**SMALL, **kwargs})


@pytest.mark.parametrize(
    "kwargs, batch, bag, size",
    [
        (SMALL, 1, 2, 64),
        (SMALL, 2, 3, 64),
        (SMALL, 1, 2, 128),
        ({**SMALL, "in_channels": 3, "num_seg_classes": 4, "num_classes": 3}, 2, 2, 64),
        ({**SMALL, "decoder_features": 4, "upsample_mode": "bilinear"}, 1, 2, 64),
        ({}, 1, 2, 64),  # full size
    ],
)
def test_forward_shapes(kwargs, batch, bag, size):
    net = M2UNet(**kwargs).eval()
    channels = kwargs.get("in_channels", 1)
    with torch.no_grad():
        class_logits, seg_logits = net(torch.rand(batch, bag, channels, size, size))
    assert class_logits.shape == (batch, kwargs.get("num_classes", 2))
    assert seg_logits.shape == (batch, bag, kwargs.get("num_seg_classes", 6), size, size)


@pytest.mark.parametrize("size", [64, 128])
def test_encoder_gives_maps_of_one_sixteenth(size):
    skips = _small().encode(torch.rand(2, 1, size, size))
    assert [tuple(s.shape[1:]) for s in skips] == [
        (8, size, size),
        (8, size // 2, size // 2),
        (8, size // 4, size // 4),
        (8, size // 8, size // 8),
        (16, size // 16, size // 16),
    ]


def test_classify_and_segment_agree_with_forward():
    net = _small().eval()
    x = torch.rand(2, 3, 1, 64, 64)
    with torch.no_grad():
        class_logits, seg_logits = net(x)
        only_class, no_seg = net(x, with_segmentation=False)
        assert no_seg is None
        torch.testing.assert_close(only_class, class_logits)
        torch.testing.assert_close(net.classify(x), class_logits)
        torch.testing.assert_close(net.classify(x, chunk_size=4), class_logits)  # 6 patches in chunks of 4
        segmented = net.segment(x.flatten(0, 1))
    assert segmented.shape == (6, 6, 64, 64)
    torch.testing.assert_close(segmented.view(2, 3, 6, 64, 64), seg_logits)


def test_seg_index_segments_only_the_chosen_patches():
    net = _small().eval()
    x = torch.rand(2, 4, 1, 64, 64)
    index = torch.tensor([3, 1])
    with torch.no_grad():
        class_logits, seg_logits = net(x)
        sub_class, sub_seg = net(x, None, True, index)
    assert sub_seg.shape == (2, 2, 6, 64, 64)
    torch.testing.assert_close(sub_seg, seg_logits[:, [3, 1]])
    torch.testing.assert_close(sub_class, class_logits)  # the classifier still sees the whole bag


@pytest.mark.parametrize(
    "index", [torch.tensor([], dtype=torch.long), torch.tensor([[0, 1]]), torch.tensor([4]), torch.tensor([-1, 0])]
)
def test_bad_seg_index_is_rejected(index):
    with pytest.raises(ValueError, match="seg_index"):
        _small()(torch.rand(1, 4, 1, 32, 32), None, True, index)


def test_padded_patches_do_not_change_the_severity():
    net = _small().eval()
    real = torch.rand(1, 2, 1, 64, 64)
    padded = torch.cat([real, torch.rand(1, 2, 1, 64, 64) * 10.0], dim=1)
    mask = torch.tensor([[True, True, False, False]])
    with torch.no_grad():
        torch.testing.assert_close(net.classify(padded, mask), net.classify(real))
        assert not torch.allclose(net.classify(padded), net.classify(real))


@pytest.mark.parametrize(
    "tasks, has_class, has_seg",
    [
        (("classification", "segmentation"), True, True),
        (("classification",), True, False),
        ("classification", True, False),
        (["segmentation"], False, True),
    ],
)
def test_variants(tasks, has_class, has_seg):
    net = _small(tasks=tasks).eval()
    x = torch.rand(1, 2, 1, 64, 64)
    with torch.no_grad():
        class_logits, seg_logits = net(x)
    assert (class_logits is not None) == has_class and (seg_logits is not None) == has_seg
    table = net.parameter_table()
    assert ("decoder1" in table) == has_seg and ("embedding_mil" in table) == has_class
    assert sum(v for k, v in table.items() if k != "total") == table["total"]
    if not has_seg:
        with pytest.raises(RuntimeError, match="segmentation"):
            net.segment(x[0])
    if not has_class:
        with pytest.raises(RuntimeError, match="classification"):
            net.classify(x)
        assert net.regularization_loss().item() == 0.0


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
def test_mil_activation_keeps_negative_values_only_without_relu(activation):
    net = _small(mil_activation=activation).eval()
    with torch.no_grad():
        net.emb_fc[0].bias.fill_(-10.0)  # every embedding-level unit negative before the activation
        patch_features = net.embed_patches(torch.rand(3, 16, 4, 4))
    assert patch_features.shape == (3, 12)
    if activation == "relu":
        assert (patch_features == 0).all()  # all units off: no gradient reaches the GCP below
    else:
        assert (patch_features < 0).all()
    assert set(net.state_dict()) == set(_small().state_dict())  # same checkpoint keys whatever the activation


@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_mil_norm_standardises_the_pooled_similarities(norm):
    net = _small(mil_norm=norm, mil_activation="identity").train()
    with torch.no_grad():
        net.emb_fc[0].bias.fill_(5.0)  # a shared offset, as GCP cosines have, that a norm must take away
        features = net.embed_patches(torch.rand(6, 16, 4, 4))  # (6 patches, 12 concepts)
    if norm == "none":
        assert features.mean() > 4.0
    else:  # standardised per patch (layer) or per unit over the patches (batch), by the norm's initial affine
        dim = 1 if norm == "layer" else 0
        torch.testing.assert_close(features.mean(dim), torch.zeros(features.shape[1 - dim]), atol=1e-4, rtol=0)
        torch.testing.assert_close(features.std(dim, unbiased=False), torch.ones(features.shape[1 - dim]), atol=0.05,
                                   rtol=0)
    keys = set(net.state_dict())
    assert {"emb_fc.0.weight", "img_fc.0.bias"} <= keys  # the 1x1 layers keep their checkpoint keys
    assert ("emb_fc.1.weight" in keys) == (norm != "none")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_torchscript_with_mil_norm(norm):
    net = _small(mil_norm=norm, gcp_pooling="lse").eval()
    x = torch.rand(2, 3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net).classify(x), net.classify(x))


def test_parameter_counts_match_table_one():
    table = M2UNet().parameter_table()
    # Table I of the paper, in units of 1024 parameters: 37K, 72K, 72K, 72K, 2595K
    assert [round(table[f"encoder{i}"] / 1024) for i in range(1, 6)] == [37, 72, 72, 72, 2595]
    # whole model ~15.32 MB in the paper's Table III; float32 parameters here
    assert 14.5 < table["total"] * 4 / 1e6 < 16.0


def test_gradients_reach_every_parameter():
    net = _small(gcp_regularization=0.1).train()
    class_logits, seg_logits = net(torch.rand(2, 2, 1, 64, 64))
    loss = class_logits.sum() + seg_logits.mean() + net.regularization_loss()
    loss.backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert net.emb_gcp.concepts.grad.abs().sum() > 0 and net.img_gcp.concepts.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # still what MONAI bundles export with
@pytest.mark.parametrize("tasks", [("classification", "segmentation"), ("classification",), ("segmentation",)])
def test_torchscript_round_trip(tmp_path, tasks):
    net = _small(tasks=tasks, gcp_pooling="lse").eval()
    path = tmp_path / "m2unet.ts"
    torch.jit.save(torch.jit.script(net), str(path))
    loaded = torch.jit.load(str(path))
    x = torch.rand(1, 3, 1, 64, 64)
    mask = torch.tensor([[True, True, False]])
    with torch.no_grad():
        for got, expected in zip(loaded(x, mask), net(x, mask)):
            assert (got is None) == (expected is None)
            if expected is not None:
                torch.testing.assert_close(got, expected)
        index = torch.tensor([2, 0])
        for got, expected in zip(loaded(x, mask, True, index), net(x, mask, True, index)):
            assert (got is None) == (expected is None)
            if expected is not None:
                torch.testing.assert_close(got, expected)
        if "classification" in tasks:
            torch.testing.assert_close(loaded.classify(x, mask), net.classify(x, mask))
        if "segmentation" in tasks:
            torch.testing.assert_close(loaded.segment(x[0]), net.segment(x[0]))
        torch.testing.assert_close(loaded.regularization_loss(), net.regularization_loss())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"in_channels": 0}, "in_channels"),
        ({"num_seg_classes": -2}, "-2"),
        ({"features": 1.5}, "1.5"),
        ({"emb_concepts": True}, "emb_concepts"),
        ({"tasks": ()}, "tasks"),
        ({"tasks": ("classification", "detection")}, "detection"),
        ({"dropout": 1.0}, "dropout"),
        ({"upsample_mode": "bicubic"}, "bicubic"),
        ({"decoder_features": 0}, "decoder_features"),
        ({"gcp_pooling": "mean"}, "mean"),
        ({"gcp_regularization": -1.0}, "-1.0"),
        ({"gcp_temperature": (0.1, 1.0, 2.0)}, "pair"),
        ({"gcp_temperature": "0.1"}, "pair"),
        ({"gcp_temperature": (0.1, -1.0)}, "-1.0"),
        ({"mil_activation": "gelu"}, "gelu"),
        ({"mil_norm": "group"}, "group"),
    ],
)
def test_ill_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        M2UNet(**{**SMALL, **kwargs})


@pytest.mark.parametrize(
    "temperature, expected",
    [(0.5, (0.5, 0.5)), (2, (2.0, 2.0)), ((0.1, 1.0), (0.1, 1.0)), ([0.2, 3.0], (0.2, 3.0))],
)
def test_gcp_temperature_per_level(temperature, expected):
    net = _small(gcp_pooling="lse", gcp_temperature=temperature)
    assert (net.emb_gcp.temperature, net.img_gcp.temperature) == expected


def test_large_image_level_temperature_approaches_the_mean_over_patches():
    """With a large image-level temperature the bag feature is the mean of the patches' cosines, not their max."""
    net = _small(gcp_pooling="lse", gcp_temperature=(0.1, 100.0)).eval()
    patch_features = torch.rand(2, 5, SMALL["emb_concepts"])
    with torch.no_grad():
        pooled = net.img_gcp(patch_features)
        cosines = net.img_gcp.similarity(patch_features)
    torch.testing.assert_close(pooled, cosines.mean(dim=1), atol=5e-3, rtol=0.0)
    assert (cosines.amax(dim=1) - pooled).amax() > 0.05


@pytest.mark.parametrize(
    "shape, mask_shape, message",
    [
        ((2, 1, 64, 64), None, "B, N, C, H, W"),  # a bag without its batch dimension
        ((1, 2, 1, 72, 64), None, "multiples of 16"),
        ((1, 2, 3, 64, 64), None, "P, 1, H, W"),
        ((1, 2, 1, 64, 64), (1, 3), "mask"),
    ],
)
def test_ill_inputs(shape, mask_shape, message):
    net = _small()
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        net(torch.rand(shape), mask)


@pytest.mark.parametrize(
    "tasks, factor, concept_factor, expected_lrs",
    [
        (("classification", "segmentation"), 0.2, 1.0, [0.01, 0.002, 0.002]),
        (("classification", "segmentation"), 1.0, 1.0, [0.01, 0.01, 0.01]),
        (("classification", "segmentation"), 1.0, 0.1, [0.01, 0.01, 0.001]),
        (("classification",), 5.0, 0.5, [0.01, 0.05, 0.025]),
        (("segmentation",), 0.2, 0.1, [0.01]),  # no head: one group
    ],
)
def test_parameter_groups_split_the_mil_head(tasks, factor, concept_factor, expected_lrs):
    net = _small(tasks=tasks)
    groups = net.parameter_groups(0.01, head_lr_factor=factor, concept_lr_factor=concept_factor)
    assert [g["lr"] for g in groups] == pytest.approx(expected_lrs)
    # every parameter in exactly one group
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())
    if len(groups) == 3:
        head = {id(p) for m in (net.emb_gcp, net.emb_fc, net.img_gcp, net.img_fc, net.classifier)
                for p in m.parameters()}
        concepts = {id(net.emb_gcp.concepts), id(net.img_gcp.concepts)}
        assert {id(p) for p in groups[1]["params"]} == head - concepts
        assert {id(p) for p in groups[2]["params"]} == concepts
    torch.optim.SGD(groups, lr=0.01)  # a valid optimizer argument


@pytest.mark.parametrize(
    "lr, factor, concept_factor, message",
    [(-0.1, 1.0, 1.0, "lr"), (0.01, 0.0, 1.0, "head_lr_factor"), (0.01, 1.0, -1.0, "concept_lr_factor")],
)
def test_parameter_groups_ill_arguments(lr, factor, concept_factor, message):
    with pytest.raises(ValueError, match=message):
        _small().parameter_groups(lr, head_lr_factor=factor, concept_lr_factor=concept_factor)
