"""M2UNet: joint lung lobe segmentation and hierarchical multiple-instance severity classification.

He et al., "Synergistic Learning of Lung Lobe Segmentation and Hierarchical Multi-Instance Classification for
Automated Severity Assessment of COVID-19 in CT Images", arXiv 2005.03832 (Table I).

A CT scan is a bag of ``N`` 2D patches (``N = 200`` of 128x128 in the paper). One U-Net-like encoder is shared by

* a segmentation decoder with skip connections, giving per-pixel logits for background + 5 lobes in every patch;
* a hierarchical MIL classifier: *embedding-level* MIL treats each patch as a bag of its ``h x w`` encoder positions
  (8x8 for a 128x128 patch) and pools them with global contrast pooling (GCP, 256 concepts) and a 1x1 conv;
  *image-level* MIL treats the scan as a bag of patch features and pools them with GCP (128 concepts) and a 1x1 conv;
  a linear classifier gives the severity logits.

Readings of the paper where it is not explicit:

* the "1x1 conv" after each GCP acts on a feature vector, so it is a fully connected layer (``nn.Linear``) of the
  same size (256 -> 256, 128 -> 128, Table I's kernels 1x1x256 and 1x1x128); it is followed by a ReLU, as the other
  convolutions of the network are, with no normalisation in between (``mil_norm`` can add one);
* "up-sample" in a decoder block is a parameter-free 2x interpolation followed by the block's 3x3 conv (so the
  decoder has no transposed convolutions); every conv has a bias and every BN an affine transform, which reproduces
  Table I's encoder counts exactly (37K, 72K, 72K, 72K, 2595K with K = 1024).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from custom_nets.gcp import GlobalContrastPooling

__all__ = ["M2UNET_TASKS", "M2UNet"]

# The two task branches; a variant keeps one of them ("classification only" / "segmentation only" in the paper).
M2UNET_TASKS = ("classification", "segmentation")
# Number of 2x2 max-pools between the 5 encoder blocks: patch sides must be multiples of 2**4 = 16.
NUM_DOWNSAMPLINGS = 4
INTERPOLATION_MODES = ("nearest", "bilinear")
# Activation after the 1x1 layer of each MIL level (the paper does not say; "relu" as its other convolutions).
MIL_ACTIVATIONS = ("relu", "leaky_relu", "identity")
# Normalisation between an MIL level's 1x1 layer and its activation (the paper has none).
MIL_NORMS = ("none", "layer", "batch")


def _double_conv(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """2 x {3x3 conv, batch norm, ReLU}: one encoding block of Table I."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _mil_activation(name: str) -> nn.Module:
    """The activation after an MIL level's 1x1 layer (``name`` is checked by the caller)."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1, inplace=True)
    return nn.Identity()


def _mil_layer(size: int, norm: str, activation: str) -> nn.Sequential:
    """An MIL level's 1x1 layer on the pooled concept similarities: linear, optional norm, activation (names checked
    by the caller)."""
    layers: list[nn.Module] = [nn.Linear(size, size)]
    if norm == "layer":
        layers.append(nn.LayerNorm(size))
    elif norm == "batch":
        layers.append(nn.BatchNorm1d(size))
    layers.append(_mil_activation(activation))
    return nn.Sequential(*layers)


def _temperature_pair(temperature: float | Sequence[float]) -> tuple[float, float]:
    """``(embedding level, image level)`` GCP temperatures from one value or a pair (values are checked by GCP)."""
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        return float(temperature), float(temperature)
    values = tuple(temperature) if isinstance(temperature, Sequence) and not isinstance(temperature, str) else ()
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"gcp_temperature must be a number or a pair of numbers, got {temperature!r}.")
    return float(values[0]), float(values[1])


class _DecoderBlock(nn.Module):
    """{2x up-sample, 3x3 conv, BN, ReLU}, concatenation with the encoder block of the same level, {3x3 conv, BN, ReLU}.

    Args:
        in_channels: channels of the coarser input.
        skip_channels: channels of the encoder features at the output resolution.
        out_channels: channels of the output.
        mode: interpolation of the up-sampling, ``"nearest"`` or ``"bilinear"``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, mode: str = "nearest") -> None:
        super().__init__()
        self.mode = mode
        self.up = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(out_channels + skip_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """x: (P, in_channels, h, w); skip: (P, skip_channels, 2h, 2w) -> (P, out_channels, 2h, 2w)."""
        if self.mode == "nearest":
            x = F.interpolate(x, size=[skip.shape[-2], skip.shape[-1]], mode="nearest")
        else:
            x = F.interpolate(x, size=[skip.shape[-2], skip.shape[-1]], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


class M2UNet(nn.Module):
    """Multi-task multi-instance U-Net for COVID-19 severity (scan level) and lung lobes (pixel level).

    Args:
        in_channels: channels of a patch (1 for windowed CT).
        num_seg_classes: segmentation classes (background + 5 lobes = 6).
        num_classes: severity classes (non-severe, severe = 2).
        features: channels of encoder blocks 1-4 (64), and of the decoder unless ``decoder_features`` is given.
        bottleneck_features: channels of encoder block 5, the instance size of the embedding-level MIL (512).
        emb_concepts: GCP concepts of the embedding-level MIL (256).
        img_concepts: GCP concepts of the image-level MIL (128).
        tasks: the branches to build, a non-empty subset of ``("classification", "segmentation")``; one of them
            alone gives the paper's "classification only" or "segmentation only" variant (the other branch's
            modules are not created, and its output is ``None``).
        gcp_regularization: weight of the concept diversity penalty of both GCP layers (see
            :meth:`regularization_loss`); 0 disables it.
        gcp_pooling: ``"max"`` (the paper) or ``"lse"`` (smooth maximum), for both GCP layers.
        gcp_temperature: temperature of the ``"lse"`` pooling: one value for both GCP layers, or a pair
            ``(embedding level, image level)``. A small temperature approaches the maximum (the paper); a large one
            approaches the mean over instances, which suits a label that depends on how *much* of the scan is
            diseased rather than on its most diseased slice.
        dropout: dropout probability before the classifier (0: none, as in the paper).
        upsample_mode: ``"nearest"`` or ``"bilinear"`` up-sampling in the decoder.
        decoder_features: channels of the decoder blocks; ``None`` (the paper) uses ``features``. The decoder at
            full patch resolution costs twice the encoder (about 4.9 against 2.4 GFLOP per 128x128 patch at 64
            channels); 32 channels cut its cost about threefold for CPU inference, at the price of a deviation from
            the paper.
        mil_activation: activation after the 1x1 layer of each MIL level: ``"relu"`` (as the paper's other
            convolutions; the paper does not say), ``"leaky_relu"`` (slope 0.1) or ``"identity"``. A ReLU unit that
            is off for every bag passes no gradient and stays off; the other two cannot switch a level off for good.
            (In the learning check a leaky ReLU still stalled at ln 2 once: that stall has another cause.)
        mil_norm: normalisation between the 1x1 layer and the activation of each MIL level: ``"none"`` (the
            paper), ``"layer"`` (``nn.LayerNorm`` over the concepts of each patch or bag) or ``"batch"``
            (``nn.BatchNorm1d`` over the patches, and over the bags at the image level, so training then needs at
            least 2 bags per step). GCP outputs are cosines that share a large offset and differ between bags by a
            few hundredths; a norm turns these differences into unit-scale features at once, where the plain 1x1
            layer has to learn that gain.

    Raises:
        ValueError: for sizes (``decoder_features`` included) that are not positive, an unknown or empty ``tasks``,
            a dropout outside [0, 1), or an unknown ``upsample_mode``, ``mil_activation`` or ``mil_norm`` (GCP
            arguments are checked by :class:`GlobalContrastPooling`).

    Inputs and outputs:
        ``forward(x, mask=None, with_segmentation=True, seg_index=None)`` takes a batch of bags ``x`` of shape
        (B, N, C, H, W), with ``H`` and ``W`` multiples of 16, and an optional bool ``mask`` (B, N), True for real
        patches and False for padding. It returns ``(class_logits, seg_logits)``: class logits (B, num_classes) and
        segmentation logits (B, N, num_seg_classes, H, W) (or of the ``K`` patches picked by ``seg_index``); an
        output is ``None`` when its branch is not built (or, for the segmentation, when ``with_segmentation`` is
        False, which skips the decoder). :meth:`classify` and :meth:`segment` give one task each.

    Cost: about 2.4 GFLOP per 128x128 patch in the encoder and 4.9 in the decoder. Training stores about 85 MB of
    activations per 128x128 patch with both tasks (about 37 MB for classification only), i.e. some 17 GB for the
    paper's bag of 200 patches.

    Example::

        net = M2UNet()
        bags = torch.rand(2, 200, 1, 128, 128)
        class_logits, seg_logits = net(bags)       # (2, 2), (2, 200, 6, 128, 128)
        severity = net.classify(bags)              # (2, 2), no decoder
        lobes = net.segment(torch.rand(8, 1, 128, 128))   # (8, 6, 128, 128)
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_seg_classes: int = 6,
        num_classes: int = 2,
        features: int = 64,
        bottleneck_features: int = 512,
        emb_concepts: int = 256,
        img_concepts: int = 128,
        tasks: Sequence[str] = M2UNET_TASKS,
        gcp_regularization: float = 0.0,
        gcp_pooling: str = "max",
        gcp_temperature: float | Sequence[float] = 0.1,
        dropout: float = 0.0,
        upsample_mode: str = "nearest",
        decoder_features: int | None = None,
        mil_activation: str = "relu",
        mil_norm: str = "none",
    ) -> None:
        super().__init__()
        sizes = {
            "in_channels": in_channels,
            "num_seg_classes": num_seg_classes,
            "num_classes": num_classes,
            "features": features,
            "bottleneck_features": bottleneck_features,
            "emb_concepts": emb_concepts,
            "img_concepts": img_concepts,
            "decoder_features": features if decoder_features is None else decoder_features,
        }
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if isinstance(tasks, str):  # a bare string would be read as a sequence of letters
            tasks = (tasks,)
        task_set = tuple(dict.fromkeys(tasks))
        unknown = [t for t in task_set if t not in M2UNET_TASKS]
        if not task_set or unknown:
            raise ValueError(f"tasks must be a non-empty subset of {M2UNET_TASKS}, got {tuple(tasks)!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if upsample_mode not in INTERPOLATION_MODES:
            raise ValueError(f"upsample_mode must be one of {INTERPOLATION_MODES}, got {upsample_mode!r}.")
        if mil_activation not in MIL_ACTIVATIONS:
            raise ValueError(f"mil_activation must be one of {MIL_ACTIVATIONS}, got {mil_activation!r}.")
        if mil_norm not in MIL_NORMS:
            raise ValueError(f"mil_norm must be one of {MIL_NORMS}, got {mil_norm!r}.")
        emb_temperature, img_temperature = _temperature_pair(gcp_temperature)

        self.in_channels = in_channels
        self.num_seg_classes = num_seg_classes
        self.num_classes = num_classes
        self.tasks = [t for t in M2UNET_TASKS if t in task_set]
        self.has_classification = "classification" in task_set
        self.has_segmentation = "segmentation" in task_set
        self.size_divisor = 2**NUM_DOWNSAMPLINGS  # patch sides must be multiples of it
        decoder_channels = features if decoder_features is None else decoder_features

        # Encoder: blocks 1-4 with `features` channels, block 5 with `bottleneck_features`; max-pool between blocks.
        channels = [features] * NUM_DOWNSAMPLINGS + [bottleneck_features]
        blocks = []
        previous = in_channels
        for out_channels in channels:
            blocks.append(_double_conv(previous, out_channels, out_channels))
            previous = out_channels
        self.encoder = nn.ModuleList(blocks)

        # Decoder: from block 5 back to the resolution of block 1, each level fused with the encoder features.
        self.decoder: nn.ModuleList | None = None
        self.seg_head: nn.Conv2d | None = None
        if self.has_segmentation:
            decoder_blocks = []
            previous = bottleneck_features
            for skip_channels in reversed(channels[:-1]):
                decoder_blocks.append(_DecoderBlock(previous, skip_channels, decoder_channels, mode=upsample_mode))
                previous = decoder_channels
            self.decoder = nn.ModuleList(decoder_blocks)
            self.seg_head = nn.Conv2d(decoder_channels, num_seg_classes, kernel_size=1)

        # Hierarchical MIL classifier (the dropout always exists so that TorchScript compiles every variant).
        self.dropout = nn.Dropout(dropout)
        self.emb_gcp: GlobalContrastPooling | None = None
        self.emb_fc: nn.Sequential | None = None
        self.img_gcp: GlobalContrastPooling | None = None
        self.img_fc: nn.Sequential | None = None
        self.classifier: nn.Linear | None = None
        if self.has_classification:
            gcp_kwargs = {"regularization": gcp_regularization, "pooling": gcp_pooling}
            self.emb_gcp = GlobalContrastPooling(
                bottleneck_features, emb_concepts, temperature=emb_temperature, **gcp_kwargs
            )
            self.emb_fc = _mil_layer(emb_concepts, mil_norm, mil_activation)
            self.img_gcp = GlobalContrastPooling(emb_concepts, img_concepts, temperature=img_temperature, **gcp_kwargs)
            self.img_fc = _mil_layer(img_concepts, mil_norm, mil_activation)
            self.classifier = nn.Linear(img_concepts, num_classes)

    # ----------------------------------------------------------------------------------------------- building blocks
    def _check_patches(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected patches of shape (P, {self.in_channels}, H, W), got {list(x.shape)}.")
        factor = self.size_divisor
        if x.shape[-2] % factor != 0 or x.shape[-1] % factor != 0:
            raise ValueError(f"patch height and width must be multiples of {factor}, got {list(x.shape[-2:])}.")

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of every block.

        Args:
            x: patches, shape (P, C, H, W), H and W multiples of 16.

        Returns:
            5 tensors: (P, features, H / 2**i, W / 2**i) for blocks i = 0..3 and (P, bottleneck, H / 16, W / 16).
        """
        self._check_patches(x)
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.encoder):
            if i > 0:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            x = block(x)
            skips.append(x)
        return skips

    def decode(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """Segmentation logits from the encoder features of :meth:`encode`, shape (P, num_seg_classes, H, W)."""
        decoder = self.decoder
        seg_head = self.seg_head
        if decoder is None or seg_head is None:
            raise RuntimeError(f"this M2UNet has no segmentation branch (tasks={self.tasks}).")
        x = skips[-1]
        for i, block in enumerate(decoder):
            x = block(x, skips[len(skips) - 2 - i])
        return seg_head(x)

    def embed_patches(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """Embedding-level MIL: each patch is a bag of its ``h * w`` encoder positions.

        Args:
            bottleneck: encoder block 5 output, shape (P, bottleneck_features, h, w).

        Returns:
            patch features, shape (P, emb_concepts).
        """
        emb_gcp = self.emb_gcp
        emb_fc = self.emb_fc
        if emb_gcp is None or emb_fc is None:
            raise RuntimeError(f"this M2UNet has no classification branch (tasks={self.tasks}).")
        instances = bottleneck.flatten(2).transpose(1, 2)  # (P, h * w, D): one instance per position
        return emb_fc(emb_gcp(instances))

    def pool_bags(self, patch_features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image-level MIL and classifier.

        Args:
            patch_features: shape (B, N, emb_concepts).
            mask: optional bool tensor (B, N), False for padded patches.

        Returns:
            class logits, shape (B, num_classes).
        """
        img_gcp = self.img_gcp
        img_fc = self.img_fc
        classifier = self.classifier
        if img_gcp is None or img_fc is None or classifier is None:
            raise RuntimeError(f"this M2UNet has no classification branch (tasks={self.tasks}).")
        bag = img_fc(img_gcp(patch_features, mask))
        return classifier(self.dropout(bag))

    # ---------------------------------------------------------------------------------------------------- entry points
    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        with_segmentation: bool = True,
        seg_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Both tasks on a batch of bags.

        Args:
            x: bags of patches, shape (B, N, C, H, W), H and W multiples of 16.
            mask: optional bool tensor (B, N), True for real patches, False for padding (padded patches never
                reach the bag feature; their segmentation logits are computed but meaningless). In train mode padded
                patches still enter the batch-norm statistics: train on full bags where possible.
            with_segmentation: False skips the decoder (cheap test-time classification).
            seg_index: optional int64 tensor (K,) of patch positions in ``[0, N)``: only these patches of every bag
                go through the decoder (the classifier still sees all ``N``). The decoder costs about twice the
                encoder, so segmenting a random subset of each bag makes a training step much cheaper while the
                segmentation loss stays an unbiased estimate of its value on the whole bag.

        Returns:
            ``(class_logits, seg_logits)``: (B, num_classes) or ``None`` without the classification branch;
            (B, N, num_seg_classes, H, W), or (B, K, ...) with ``seg_index``, or ``None`` without the segmentation
            branch or ``with_segmentation``.
        """
        if x.dim() != 5:
            raise ValueError(f"expected bags of shape (B, N, C, H, W), got {list(x.shape)}.")
        b, n = x.shape[0], x.shape[1]
        if mask is not None and (mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] != n):
            raise ValueError(f"expected a mask of shape [{b}, {n}], got {list(mask.shape)}.")
        # one host-device sync per step for the range check (min and max would be two)
        if seg_index is not None and (
            seg_index.dim() != 1 or seg_index.numel() == 0 or bool(((seg_index < 0) | (seg_index >= n)).any())
        ):
            raise ValueError(f"seg_index must be a non-empty 1D tensor of positions in [0, {n}), got {seg_index}.")
        skips = self.encode(x.flatten(0, 1))  # all patches of all bags at once: (B * N, C, H, W)
        class_logits: torch.Tensor | None = None
        seg_logits: torch.Tensor | None = None
        if self.has_classification:
            patch_features = self.embed_patches(skips[-1])
            class_logits = self.pool_bags(patch_features.view(b, n, patch_features.shape[-1]), mask)
        if self.has_segmentation and with_segmentation:
            k = n
            if seg_index is not None:
                k = seg_index.numel()
                skips = [s.view(b, n, s.shape[1], s.shape[2], s.shape[3])[:, seg_index].flatten(0, 1) for s in skips]
            seg = self.decode(skips)
            seg_logits = seg.view(b, k, seg.shape[1], seg.shape[2], seg.shape[3])
        return class_logits, seg_logits

    @torch.jit.export
    def classify(self, x: torch.Tensor, mask: torch.Tensor | None = None, chunk_size: int = 0) -> torch.Tensor:
        """Severity logits only: encoder and MIL branch, no decoder.

        Args:
            x: bags of patches, shape (B, N, C, H, W).
            mask: optional bool tensor (B, N), False for padded patches.
            chunk_size: when positive, patches go through the encoder that many at a time, which bounds the peak
                memory of inference on large bags (the result is the same in eval mode; in train mode batch-norm
                statistics would be per chunk, so keep 0 for training).

        Returns:
            class logits, shape (B, num_classes).
        """
        if not self.has_classification:
            raise RuntimeError(f"this M2UNet has no classification branch (tasks={self.tasks}).")
        if x.dim() != 5:
            raise ValueError(f"expected bags of shape (B, N, C, H, W), got {list(x.shape)}.")
        if mask is not None and (mask.dim() != 2 or mask.shape[0] != x.shape[0] or mask.shape[1] != x.shape[1]):
            raise ValueError(f"expected a mask of shape [{x.shape[0]}, {x.shape[1]}], got {list(mask.shape)}.")
        b, n = x.shape[0], x.shape[1]
        patches = x.flatten(0, 1)
        step = chunk_size if chunk_size > 0 else patches.shape[0]
        features: list[torch.Tensor] = []
        for start in range(0, patches.shape[0], step):
            features.append(self.embed_patches(self.encode(patches[start : start + step])[-1]))
        patch_features = torch.cat(features, dim=0)
        return self.pool_bags(patch_features.view(b, n, patch_features.shape[-1]), mask)

    @torch.jit.export
    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Lobe segmentation logits of independent patches or slices (encoder + decoder, no MIL).

        Suits sliding-window inference over whole slices (e.g. MONAI ``SlidingWindowInferer`` with ``network.segment``
        as the predictor).

        Args:
            x: patches, shape (P, C, H, W), H and W multiples of 16.

        Returns:
            logits, shape (P, num_seg_classes, H, W).
        """
        if not self.has_segmentation:
            raise RuntimeError(f"this M2UNet has no segmentation branch (tasks={self.tasks}).")
        return self.decode(self.encode(x))

    @torch.jit.export
    def regularization_loss(self) -> torch.Tensor:
        """Sum of the concept regularisers of the two GCP layers (a scalar; 0 without the classification branch)."""
        emb_gcp = self.emb_gcp
        img_gcp = self.img_gcp
        if emb_gcp is None or img_gcp is None:
            return self.encoder[0][0].weight.new_zeros(())
        return emb_gcp.regularization_loss() + img_gcp.regularization_loss()

    @torch.jit.ignore
    def parameter_groups(self, lr: float, head_lr_factor: float = 1.0, concept_lr_factor: float = 1.0) -> list[dict]:
        """Optimizer parameter groups: the encoder and decoder at ``lr``, the MIL head (both GCP layers, their 1x1
        layers and the classifier) at ``lr * head_lr_factor``, and within it the GCP concepts at
        ``lr * head_lr_factor * concept_lr_factor``.

        A slower head keeps the GCP chain from settling into a constant output early on, where the severity loss can
        stay at ln 2 for hundreds of steps (see the bundle README); ``head_lr_factor=1`` is the paper's single rate.
        The concepts are a case apart: only their direction counts (cosine), and Adam moves every element of a
        concept by about the learning rate whatever its size, so at a rate that suits the 1x1 layers (which must grow
        to scale the bounded cosines into confident logits) the concepts of unit norm turn by about a percent per
        step and wander with the gradient noise. ``concept_lr_factor`` slows them alone.

        Args:
            lr: learning rate of the encoder and decoder.
            head_lr_factor: multiplier of ``lr`` for the MIL head, > 0.
            concept_lr_factor: further multiplier for the GCP concept vectors, > 0.

        Returns:
            a list of ``{"params": [...], "lr": ...}`` dicts for a ``torch.optim`` optimizer (shared layers, the
            head's other parameters, the concepts); a group without parameters (a branch not built) is left out.

        Raises:
            ValueError: when ``lr`` is negative or a factor is not positive.
        """
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}.")
        if not head_lr_factor > 0.0:
            raise ValueError(f"head_lr_factor must be > 0, got {head_lr_factor}.")
        if not concept_lr_factor > 0.0:
            raise ValueError(f"concept_lr_factor must be > 0, got {concept_lr_factor}.")
        head_modules = (self.emb_gcp, self.emb_fc, self.img_gcp, self.img_fc, self.classifier)
        head_ids = {id(p) for m in head_modules if m is not None for p in m.parameters()}
        concept_ids = {id(m.concepts) for m in (self.emb_gcp, self.img_gcp) if m is not None}
        shared = [p for p in self.parameters() if id(p) not in head_ids]
        head = [p for p in self.parameters() if id(p) in head_ids and id(p) not in concept_ids]
        concepts = [p for p in self.parameters() if id(p) in concept_ids]
        head_lr = float(lr) * float(head_lr_factor)
        groups = [
            {"params": shared, "lr": float(lr)},
            {"params": head, "lr": head_lr},
            {"params": concepts, "lr": head_lr * float(concept_lr_factor)},
        ]
        return [g for g in groups if g["params"]]

    # --------------------------------------------------------------------------------------------------- reporting
    @torch.jit.ignore
    def parameter_table(self) -> dict[str, int]:
        """Number of parameters per part, in the order of the paper's Table I, plus ``"total"``.

        Keys: ``encoder1`` .. ``encoder5``, ``embedding_mil`` (GCP + 1x1 conv), ``image_mil`` (GCP + 1x1 conv),
        ``classifier``, ``decoder1`` .. ``decoder4`` (coarsest first), ``seg_head``, ``total``; parts not built are
        left out. Multiply ``total`` by 4 for the size in bytes in float32.
        """

        def count(*modules: nn.Module | None) -> int:
            return sum(p.numel() for m in modules if m is not None for p in m.parameters())

        table: dict[str, int] = {f"encoder{i + 1}": count(block) for i, block in enumerate(self.encoder)}
        if self.has_classification:
            table["embedding_mil"] = count(self.emb_gcp, self.emb_fc)
            table["image_mil"] = count(self.img_gcp, self.img_fc)
            table["classifier"] = count(self.classifier)
        if self.decoder is not None:
            for i, block in enumerate(self.decoder):
                table[f"decoder{i + 1}"] = count(block)
            table["seg_head"] = count(self.seg_head)
        table["total"] = count(self)
        return table
