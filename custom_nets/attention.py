"""Gated attention pooling for multiple instance learning (DA-CMIL's spatial and instance attention).

Both modules use the gating of Ilse et al. 2018 ("Attention-based Deep Multiple Instance Learning"): a ``tanh``
branch and a ``sigmoid`` branch multiplied element-wise, then a projection to one score per element.

- :class:`GatedSpatialAttention` pools a feature map ``(N, C, H, W)`` over its ``H * W`` positions (1x1 convolutions),
  giving one ``C``-d feature per map and a spatial attention map.
- :class:`GatedInstanceAttention` pools the instances of each bag ``(B, N, D)`` (linear layers), giving one ``D``-d
  bag feature per bag and one weight per instance; a padding mask lets bags of different sizes share a batch.
"""

from __future__ import annotations

import torch
from torch import nn

from custom_nets.checks import check_positive_int

__all__ = ["SPATIAL_NORMALIZATIONS", "GatedInstanceAttention", "GatedSpatialAttention"]

SPATIAL_NORMALIZATIONS = ("softmax", "sigmoid")


class GatedSpatialAttention(nn.Module):
    """Gated attention over the spatial positions of a feature map (DA-CMIL's spatial attention ``A_S``).

    For a feature map ``g`` of shape ``(C, H, W)`` the score of position ``p`` is
    ``phi_p = w^T (tanh(V g_p) * sigmoid(U g_p))`` with ``V``, ``U`` and ``w`` 1x1 convolutions; the scores are turned
    into weights ``a_p`` summing to 1 over the ``H * W`` positions and the pooled feature is ``sum_p a_p g_p``.

    The paper does not say how the scores are normalised; both readings are offered:

    - ``"softmax"`` (default): ``a = softmax(phi)`` over the positions, as in Ilse et al.'s instance attention,
      so the spatial and instance attention behave alike. The weights are competitive: one position can take
      almost all the mass.
    - ``"sigmoid"``: ``a = sigmoid(phi) / sum(sigmoid(phi))``; each position is gated independently, then the gates
      are normalised to sum to 1 so the pooled feature stays on the scale of a global average (uniform gates give
      exactly global average pooling). Several separate regions (e.g. bilateral lesions) can keep high weights.

    Args:
        in_channels: number of channels ``C`` of the feature map.
        hidden_channels: channels of the tanh and sigmoid branches.
        normalization: ``"softmax"`` or ``"sigmoid"``, see above.

    Raises:
        ValueError: when a size is not a positive integer or ``normalization`` is unknown.

    Example::

        >>> pool = GatedSpatialAttention(512, 128)
        >>> feature, attention = pool(torch.randn(4, 512, 8, 8))
        >>> feature.shape, attention.shape
        (torch.Size([4, 512]), torch.Size([4, 8, 8]))
    """

    def __init__(self, in_channels: int, hidden_channels: int = 128, normalization: str = "softmax") -> None:
        super().__init__()
        in_channels = check_positive_int("in_channels", in_channels)
        hidden_channels = check_positive_int("hidden_channels", hidden_channels)
        if normalization not in SPATIAL_NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {SPATIAL_NORMALIZATIONS}, got {normalization!r}.")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.normalization = normalization
        self.attention_v = nn.Conv2d(in_channels, hidden_channels, kernel_size=1)
        self.attention_u = nn.Conv2d(in_channels, hidden_channels, kernel_size=1)
        self.attention_w = nn.Conv2d(hidden_channels, 1, kernel_size=1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised position scores ``phi``.

        Args:
            x: feature maps, shape ``(N, C, H, W)``.

        Returns:
            scores, shape ``(N, H * W)``.
        """
        gated = torch.tanh(self.attention_v(x)) * torch.sigmoid(self.attention_u(x))
        return self.attention_w(gated).flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool each feature map with its attention weights.

        Args:
            x: feature maps, shape ``(N, C, H, W)``.

        Returns:
            ``(features, attention)``: pooled features ``(N, C)`` and attention maps ``(N, H, W)`` whose entries
            are non-negative and sum to 1 over each map.
        """
        if x.dim() != 4:
            raise ValueError(f"expected feature maps of shape (N, C, H, W), got {x.dim()} dimensions.")
        n, _, h, w = x.shape
        phi = self.scores(x)
        if self.normalization == "softmax":
            weights = torch.softmax(phi, dim=1)
        else:
            gates = torch.sigmoid(phi)
            # The clamp keeps the division finite if every gate underflows (only for extreme negative scores).
            weights = gates / gates.sum(dim=1, keepdim=True).clamp_min(1e-8)
        # (N, 1, HW) @ (N, HW, C) -> (N, 1, C): the weighted sum over positions as one batched matmul.
        features = torch.bmm(weights.unsqueeze(1), x.flatten(2).transpose(1, 2)).squeeze(1)
        return features, weights.view(n, h, w)


class GatedInstanceAttention(nn.Module):
    """Gated attention pooling of the instances of each bag (Ilse et al. 2018; DA-CMIL's instance attention ``A_I``).

    ``a_n = softmax_n(w^T (tanh(V h_n) * sigmoid(U h_n)))`` over the instances of one bag and the bag feature is
    ``z = sum_n a_n h_n``.

    Bags of different sizes are batched by padding to a common ``N`` and passing ``mask`` (``True`` = real
    instance). Padded instances get a weight of exactly 0 (their scores are set to ``-inf`` before the softmax),
    so a padded bag gives the same feature and weights as the same bag alone. A bag with no real instance gets
    all-zero weights and a zero feature instead of NaN.

    Args:
        in_features: size ``D`` of the instance features.
        hidden_features: size of the tanh and sigmoid branches (Ilse et al. use 128).

    Raises:
        ValueError: when a size is not a positive integer.

    Example::

        >>> pool = GatedInstanceAttention(512, 128)
        >>> bag, weights = pool(torch.randn(2, 5, 512), mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool())
        >>> bag.shape, weights.shape
        (torch.Size([2, 512]), torch.Size([2, 5]))
    """

    def __init__(self, in_features: int, hidden_features: int = 128) -> None:
        super().__init__()
        in_features = check_positive_int("in_features", in_features)
        hidden_features = check_positive_int("hidden_features", hidden_features)
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.attention_v = nn.Linear(in_features, hidden_features)
        self.attention_u = nn.Linear(in_features, hidden_features)
        self.attention_w = nn.Linear(hidden_features, 1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised instance scores.

        Args:
            x: instance features, shape ``(B, N, D)``.

        Returns:
            scores, shape ``(B, N)``.
        """
        gated = torch.tanh(self.attention_v(x)) * torch.sigmoid(self.attention_u(x))
        return self.attention_w(gated).squeeze(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool the instances of each bag.

        Args:
            x: instance features, shape ``(B, N, D)``.
            mask: optional bool tensor ``(B, N)``, ``True`` for real instances and ``False`` for padding.

        Returns:
            ``(bag_features, weights)``: bag features ``(B, D)`` and instance weights ``(B, N)`` summing to 1 over
            the real instances of each bag and exactly 0 on padding.
        """
        if x.dim() != 3:
            raise ValueError(f"expected instance features of shape (B, N, D), got {x.dim()} dimensions.")
        scores = self.scores(x)
        if mask is None:
            weights = torch.softmax(scores, dim=1)
        else:
            # Not while tracing: comparing sizes there records constants and warns, and the trace fixes shapes.
            if not torch.jit.is_tracing() and mask.shape != scores.shape:
                raise ValueError(f"mask shape {list(mask.shape)} does not match (B, N) = {list(scores.shape)}.")
            mask = mask.to(torch.bool)
            # -inf makes the softmax weight of padding exactly 0. A bag with no real instance would then be all
            # -inf (NaN weights and NaN gradients for the whole batch): give it finite scores, then zero weights.
            scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~mask.any(dim=1, keepdim=True), 0.0)
            weights = torch.softmax(scores, dim=1).masked_fill(~mask, 0.0)
        bag = torch.bmm(weights.unsqueeze(1), x).squeeze(1)
        return bag, weights
