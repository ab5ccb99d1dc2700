"""DA-CMIL: dual attention multiple instance learning for COVID-19 screening from chest CT.

Chikontwe et al., "Dual Attention Multiple Instance Learning with Unsupervised Complementary Loss for COVID-19
Screening", medRxiv 2020.09.14.20194654. A CT scan is a bag of instances (axial slices or lung patches) with one
label. Each instance goes through a 2D ResNet backbone (MONAI ``ResNet``), its last feature map is pooled to one
feature per instance (gated spatial attention), the instances of a bag are pooled to one bag feature (gated instance
attention) and a linear layer classifies the bag.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from torch import nn

from custom_nets.attention import SPATIAL_NORMALIZATIONS, GatedInstanceAttention, GatedSpatialAttention

__all__ = ["DACMIL", "DACMIL_BACKBONES", "DACMIL_POOLINGS", "ResNetFeatures"]

# name -> (block, layers); block widths are ResNet's (64, 128, 256, 512).
DACMIL_BACKBONES: dict[str, tuple[type[ResNetBlock | ResNetBottleneck], list[int]]] = {
    "resnet10": (ResNetBlock, [1, 1, 1, 1]),
    "resnet18": (ResNetBlock, [2, 2, 2, 2]),
    "resnet34": (ResNetBlock, [3, 4, 6, 3]),
    "resnet50": (ResNetBottleneck, [3, 4, 6, 3]),
}
DACMIL_POOLINGS = ("dual", "attention", "max", "mean")
_BLOCK_INPLANES = [64, 128, 256, 512]
# Keys that may wrap a state dict in a checkpoint file (MONAI CheckpointSaver, common training scripts).
_CHECKPOINT_WRAPPERS = ("state_dict", "model", "network", "net")


class ResNetFeatures(nn.Module):
    """The convolutional part of a MONAI 2D ``ResNet`` (stem and four stages): images to last feature maps.

    Parameter names are those of ``monai.networks.nets.ResNet`` (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so a
    state dict of a MONAI ResNet loads directly (its ``fc`` keys aside).

    Args:
        resnet: a MONAI ``ResNet``; its average pooling and ``fc`` are dropped.
        out_channels: channels of the last feature map.
    """

    def __init__(self, resnet: ResNet, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.act = resnet.act
        self.maxpool = nn.Identity() if resnet.no_max_pool else resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: images ``(M, C_in, H, W)``.

        Returns:
            feature maps ``(M, out_channels, H / s, W / s)`` with ``s = 16 * conv1_stride`` (32 by default).
        """
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class _GlobalAveragePool(nn.Module):
    """Global average pooling with the interface of :class:`GatedSpatialAttention` (its map is uniform)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        # The uniform map is what global average pooling weighs each position with, so downstream attention
        # outputs (overlays, NIfTI maps) keep one shape for every pooling variant.
        uniform = torch.full((n, h, w), 1.0 / (h * w), dtype=x.dtype, device=x.device)
        return x.mean(dim=(2, 3)), uniform


def _replace_batch_norm(module: nn.Module, norm: str | tuple) -> None:
    """Swap every 2D batch-norm layer under ``module`` for ``norm`` (MONAI ``get_norm_layer``), in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            replacement = get_norm_layer(name=norm, spatial_dims=2, channels=child.num_features)
            setattr(module, name, replacement)
        else:
            _replace_batch_norm(child, norm)


class DACMIL(nn.Module):
    """Dual attention MIL network for bag-level classification of CT scans (slices or patches as instances).

    Pipeline per bag of ``N`` instances: ResNet backbone -> feature maps ``(N, D, h, w)`` -> spatial pooling ->
    instance features ``(N, D)`` -> instance pooling -> bag feature ``(D,)`` -> linear classifier -> logits.
    ``D`` is 512 for ResNet-10/18/34 and 2048 for ResNet-50; a 256x256 input gives 8x8 maps with the default
    stride-2 stem (MONAI's own default stem stride of 1 would give 16x16 maps at about 4 times the cost).

    ``pooling`` selects the variant compared in the paper:

    - ``"dual"`` (DA-CMIL): gated spatial attention, then gated instance attention.
    - ``"attention"`` (DeepAttentionMIL, Ilse et al. 2018): global average pooling, then gated instance attention.
    - ``"max"`` (ClassicMIL, Campanella et al. 2019): global average pooling, the classifier scores every instance
      and the bag logits are the logits of the top-scoring instance. The score is ``1 - softmax(logits)[0]`` (the
      probability of not being class 0, i.e. of class 1 when ``num_classes == 2``), or the single logit when
      ``num_classes == 1``. The bag feature is that instance's feature and its instance weight is 1.
    - ``"mean"``: global average pooling, then the mean of the instance features (uniform instance weights).

    Batching bags of different sizes: the input is a padded tensor ``(B, N, C, H, W)`` with a bool ``mask`` ``(B, N)``
    (``True`` = real instance). Only real instances go through the backbone (padding costs no compute and does not
    enter batch-norm statistics); padded positions get zero features, zero attention and zero weights, so a bag in a
    padded batch gives the same outputs as the same bag alone (in eval mode; in train mode batch norm couples the
    instances of a batch anyway). Without a mask every instance is real. Every bag needs at least one real instance.

    Long bags (hundreds of slices at inference): ``instance_chunk_size`` runs the backbone and spatial pooling on at
    most that many instances at a time, so activation memory stays bounded by the chunk (only the pooled features
    and small attention maps are kept). Under autograd the chunks' activations are all kept for backward anyway, so
    chunking bounds memory at inference (``torch.no_grad``) only.

    ``forward`` returns the logits only (TorchScript-friendly, works with MONAI inferers and ``verify_net_in_out``);
    :meth:`forward_features` returns every intermediate (attention, features) of the same single pass and is what
    training and inference code should call.

    Args:
        backbone: one of ``"resnet10"``, ``"resnet18"``, ``"resnet34"`` (the paper) and ``"resnet50"``.
        in_channels: image channels (1 for CT).
        num_classes: number of bag classes (2: other pneumonia / COVID-19).
        pooling: ``"dual"``, ``"attention"``, ``"max"`` or ``"mean"``, see above.
        attention_hidden: hidden size of both gated attention modules.
        spatial_normalization: ``"softmax"`` or ``"sigmoid"`` for the spatial attention, see
            :class:`GatedSpatialAttention` (``"dual"`` only).
        conv1_stride: stride of the backbone's first convolution (2 as in the standard ResNet).
        instance_chunk_size: run at most this many instances through the backbone at once; ``None`` for all at once.
        pretrained_path: optional checkpoint with backbone weights, see :meth:`load_backbone_weights`.
        norm: the backbone's feature normalisation, as MONAI's ``get_norm_layer`` takes it: ``"batch"`` (the
            paper's ResNet) or e.g. ``("group", {"num_groups": 32})``, which normalises each slice on its own, so a
            slice's features do not depend on the other bags of the mini-batch (small batches of bags).

    Raises:
        ValueError: for an unknown backbone or pooling, or a size that is not a positive integer.

    Example::

        >>> net = DACMIL(backbone="resnet18", pooling="dual")
        >>> x = torch.randn(2, 4, 1, 64, 64)  # 2 bags of 4 slices
        >>> mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
        >>> out = net.forward_features(x, mask)
        >>> out["logits"].shape, out["instance_weights"].shape, out["spatial_attention"].shape
        (torch.Size([2, 2]), torch.Size([2, 4]), torch.Size([2, 4, 2, 2]))
    """

    def __init__(
        self,
        backbone: str = "resnet34",
        in_channels: int = 1,
        num_classes: int = 2,
        pooling: str = "dual",
        attention_hidden: int = 128,
        spatial_normalization: str = "softmax",
        conv1_stride: int = 2,
        instance_chunk_size: int | None = None,
        pretrained_path: str | Path | None = None,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        if backbone not in DACMIL_BACKBONES:
            raise ValueError(f"backbone must be one of {tuple(DACMIL_BACKBONES)}, got {backbone!r}.")
        if pooling not in DACMIL_POOLINGS:
            raise ValueError(f"pooling must be one of {DACMIL_POOLINGS}, got {pooling!r}.")
        # Checked for every variant, so a typo in a config fails even where the spatial attention is unused.
        if spatial_normalization not in SPATIAL_NORMALIZATIONS:
            raise ValueError(
                f"spatial_normalization must be one of {SPATIAL_NORMALIZATIONS}, got {spatial_normalization!r}."
            )
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("attention_hidden", attention_hidden),
            ("conv1_stride", conv1_stride),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if instance_chunk_size is not None and (
            isinstance(instance_chunk_size, bool) or not isinstance(instance_chunk_size, int) or instance_chunk_size < 1
        ):
            raise ValueError(f"instance_chunk_size must be a positive integer or None, got {instance_chunk_size!r}.")

        block, layers = DACMIL_BACKBONES[backbone]
        resnet = ResNet(
            block=block,
            layers=layers,
            block_inplanes=_BLOCK_INPLANES,
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=conv1_stride,
            feed_forward=False,
            norm=norm,
        )
        if norm != "batch":
            # MONAI 1.6's ResNet applies `norm` to its stem only; its residual layers are built with batch norm.
            _replace_batch_norm(resnet, norm)
        feature_dim = _BLOCK_INPLANES[-1] * block.expansion
        self.backbone_name = backbone
        self.pooling = pooling
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        # TorchScript attributes must be typed: 0 stands for "no chunking".
        self.instance_chunk_size: int = 0 if instance_chunk_size is None else instance_chunk_size
        self.backbone = ResNetFeatures(resnet, feature_dim)
        self.spatial_pool: nn.Module = (
            GatedSpatialAttention(feature_dim, attention_hidden, spatial_normalization)
            if pooling == "dual"
            else _GlobalAveragePool()
        )
        self.instance_attention: GatedInstanceAttention | None = (
            GatedInstanceAttention(feature_dim, attention_hidden) if pooling in ("dual", "attention") else None
        )
        # Bag classifier H_B; for "max" it is applied to every instance (ClassicMIL's instance classifier).
        self.classifier = nn.Linear(feature_dim, num_classes)
        if pretrained_path is not None:
            self.load_backbone_weights(pretrained_path)

    # ------------------------------------------------------------------ forward
    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone and spatial pooling, chunked over instances: ``(M, C, H, W)`` -> ``(M, D)``, ``(M, h, w)``."""
        chunk = self.instance_chunk_size
        if chunk <= 0 or x.shape[0] <= chunk:
            return self.spatial_pool(self.backbone(x))
        features: list[torch.Tensor] = []
        maps: list[torch.Tensor] = []
        for part in torch.split(x, chunk, dim=0):
            f, m = self.spatial_pool(self.backbone(part))
            features.append(f)
            maps.append(m)
        return torch.cat(features, dim=0), torch.cat(maps, dim=0)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run the network once and return every output.

        Args:
            x: padded bags ``(B, N, C, H, W)``.
            mask: optional bool ``(B, N)``, ``True`` for real instances; ``None`` means all are real.

        Returns:
            a dict of tensors:

            - ``"logits"``: bag logits ``(B, num_classes)``.
            - ``"bag_features"``: ``(B, D)``, the input of the bag classifier.
            - ``"instance_features"``: ``(B, N, D)`` after spatial pooling (zeros on padding).
            - ``"instance_weights"``: ``(B, N)``, summing to 1 over the real instances of a bag, 0 on padding.
            - ``"instance_logits"``: ``(B, N, num_classes)``, the classifier applied to each instance feature
              (ClassicMIL's instance scores; for the other variants a per-instance reading of the bag classifier).
            - ``"spatial_attention"``: ``(B, N, h, w)``, summing to 1 over each real instance's map, 0 on padding
              (uniform for the variants that average-pool).
            - ``"mask"``: the bool mask ``(B, N)`` used.

        Raises:
            ValueError: when ``x`` is not 5-D, the mask shape does not match or a bag has no real instance.
        """
        if x.dim() != 5:
            raise ValueError(f"expected bags of shape (B, N, C, H, W), got {x.dim()} dimensions.")
        b, n = x.shape[0], x.shape[1]
        flat = x.reshape(b * n, x.shape[2], x.shape[3], x.shape[4])
        if mask is None:
            full_mask = torch.ones((b, n), dtype=torch.bool, device=x.device)
            inst_flat, maps_flat = self._encode(flat)
        else:
            if mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] != n:
                raise ValueError(f"mask shape {list(mask.shape)} does not match (B, N) = {[b, n]}.")
            full_mask = mask.to(device=x.device, dtype=torch.bool)
            # Skipped while tracing: the check is data-dependent and a trace would freeze its outcome anyway.
            if not torch.jit.is_tracing() and not bool(full_mask.any(dim=1).all()):
                raise ValueError("every bag needs at least one real instance (a mask row is all False).")
            # Only real instances go through the backbone: padding costs nothing and stays out of batch norm.
            index = full_mask.reshape(-1).nonzero().squeeze(1)
            real_features, real_maps = self._encode(flat.index_select(0, index))
            inst_flat = real_features.new_zeros((b * n, real_features.shape[1])).index_copy(0, index, real_features)
            maps_flat = real_maps.new_zeros((b * n, real_maps.shape[1], real_maps.shape[2])).index_copy(
                0, index, real_maps
            )
        instance_features = inst_flat.reshape(b, n, inst_flat.shape[1])
        spatial_attention = maps_flat.reshape(b, n, maps_flat.shape[1], maps_flat.shape[2])
        instance_logits = self.classifier(instance_features)

        if self.instance_attention is not None:  # "dual" and "attention"
            # Without padding the unmasked softmax is used (cheaper, and nothing data-dependent to trace).
            bag_features, weights = self.instance_attention(instance_features, mask if mask is None else full_mask)
            logits = self.classifier(bag_features)
        elif self.pooling == "max":
            if self.num_classes == 1:
                scores = instance_logits[:, :, 0]
            else:
                scores = 1.0 - torch.softmax(instance_logits, dim=-1)[:, :, 0]
            top = scores.masked_fill(~full_mask, float("-inf")).argmax(dim=1)  # (B,)
            weights = torch.zeros((b, n), dtype=instance_features.dtype, device=x.device)
            weights = weights.scatter(1, top.unsqueeze(1), 1.0)
            gather_index = top.view(b, 1, 1)
            bag_features = instance_features.gather(1, gather_index.expand(b, 1, self.feature_dim)).squeeze(1)
            logits = instance_logits.gather(1, gather_index.expand(b, 1, self.num_classes)).squeeze(1)
        else:  # "mean"
            real = full_mask.to(instance_features.dtype)
            weights = real / real.sum(dim=1, keepdim=True)
            bag_features = torch.bmm(weights.unsqueeze(1), instance_features).squeeze(1)
            logits = self.classifier(bag_features)

        return {
            "logits": logits,
            "bag_features": bag_features,
            "instance_features": instance_features,
            "instance_weights": weights,
            "instance_logits": instance_logits,
            "spatial_attention": spatial_attention,
            "mask": full_mask,
        }

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bag logits.

        Args:
            x: padded bags ``(B, N, C, H, W)``.
            mask: optional bool ``(B, N)``, ``True`` for real instances.

        Returns:
            logits ``(B, num_classes)``.
        """
        return self.forward_features(x, mask)["logits"]

    # ------------------------------------------------------------------ parameters
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the ResNet backbone (the paper trains them with lr 1e-4)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of everything after the backbone: attention modules and classifier (lr 1e-3 in the paper)."""
        for name, module in self.named_children():
            if name != "backbone":
                yield from module.parameters()

    def param_groups(self, backbone_lr: float = 1e-4, head_lr: float = 1e-3) -> list[dict]:
        """Optimizer parameter groups with separate learning rates, e.g. ``torch.optim.Adam(net.param_groups())``.

        Args:
            backbone_lr: learning rate of the backbone.
            head_lr: learning rate of the attention modules and classifier.

        Raises:
            ValueError: when a learning rate is not positive.
        """
        for name, value in (("backbone_lr", backbone_lr), ("head_lr", head_lr)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}.")
        return [
            {"params": list(self.backbone_parameters()), "lr": backbone_lr, "name": "backbone"},
            {"params": list(self.head_parameters()), "lr": head_lr, "name": "head"},
        ]

    # ------------------------------------------------------------------ weights
    @torch.jit.unused
    def load_backbone_weights(self, path: str | Path) -> None:
        """Load backbone weights from a checkpoint file.

        Accepted: a state dict of a MONAI 2D ``ResNet`` of the same depth (its ``fc.*`` keys are ignored), a backbone
        state dict saved from this class, or a whole ``DACMIL`` state dict (only ``backbone.*`` is used); optionally
        wrapped under ``"state_dict"``, ``"model"``, ``"network"`` or ``"net"`` and with DDP's ``module.`` prefix.
        Loading is strict: every backbone parameter must be present with the right shape.

        Args:
            path: checkpoint file (``torch.save`` format).

        Raises:
            FileNotFoundError: when the file does not exist.
            TypeError: when the file holds something other than a state dict.
            ValueError: when the file holds no backbone keys, lacks some, or has unexpected ones.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained backbone checkpoint not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in _CHECKPOINT_WRAPPERS:
            if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
        if not isinstance(state, Mapping):
            raise TypeError(f"{path} does not hold a state dict (got {type(state).__name__}).")
        has_backbone_prefix = any(str(k).startswith(("backbone.", "module.backbone.")) for k in state)
        cleaned: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            key = str(key).removeprefix("module.")  # DDP checkpoints prefix every key
            if has_backbone_prefix:
                # A whole DACMIL checkpoint: keep the backbone, drop attention and classifier.
                if not key.startswith("backbone."):
                    continue
                key = key[len("backbone.") :]
            if key.startswith("fc."):  # the ImageNet/other-task classifier of a plain ResNet
                continue
            cleaned[key] = value
        expected = set(self.backbone.state_dict())
        if not expected & set(cleaned):
            sample = sorted(str(k) for k in state)[:5]
            raise ValueError(
                f"{path} holds no {self.backbone_name} backbone keys (expected e.g. 'conv1.weight', "
                f"'layer1.0.conv1.weight'; found e.g. {sample})."
            )
        missing = sorted(expected - set(cleaned))
        unexpected = sorted(set(cleaned) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the {self.backbone_name} backbone: "
                f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}."
            )
        try:
            self.backbone.load_state_dict(cleaned, strict=True)
        except RuntimeError as error:  # shape mismatches (e.g. 3-channel stem into a 1-channel network)
            raise ValueError(f"{path} does not fit the {self.backbone_name} backbone: {error}") from error
