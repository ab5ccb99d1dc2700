"""Global contrast pooling (GCP), the multiple-instance pooling of M2UNet (He et al., arXiv 2005.03832, Eq. 1-2).

GCP comes from the same group's MIDCN work (PRICAI 2019). A bag of instance features is summarised by its similarity
to ``M`` learned *concept* vectors: for concept ``m`` the bag feature is the largest cosine similarity between the
concept and any instance of the bag,

    s_m = max_k cos(w_m, phi_k),

so the output is an ordered ``M``-vector whatever the number of instances. Training pulls the instances that matter
towards the concepts and leaves the others away from them.

Reading of the paper's regulariser. Eq. 2 writes ``s_im = max_k w_m^T phi_ik + R(w_m)``, where ``R`` only depends on
the concepts, so it cannot change which instance wins nor the gradient that flows to the instances: it is a penalty
on the concepts and belongs to the training objective. Here it is a *diversity* penalty, the mean squared cosine
similarity between distinct concepts times ``regularization``; it is returned by
:meth:`GlobalContrastPooling.regularization_loss` so that the training loss can add it (see
``custom_nets.losses.multitask.M2UNetLoss``). The paper does not give the form of ``R``; with ``regularization=0``
no penalty is applied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GlobalContrastPooling"]

# Pooling modes: "max" is the paper's Eq. 1; "lse" is a smooth maximum for denser gradients.
GCP_POOLING_MODES = ("max", "lse")


class GlobalContrastPooling(nn.Module):
    """Pools a bag of instance features into the maximum cosine similarity with each of ``M`` learned concepts.

    Args:
        in_features: size ``D`` of an instance feature.
        num_concepts: number of concepts ``M`` (the size of the pooled bag feature).
        regularization: weight of the concept diversity penalty returned by :meth:`regularization_loss` (mean squared
            cosine between distinct concepts); 0 disables it.
        pooling: ``"max"`` (the paper: maximum over instances, gradient only through the winning instance) or
            ``"lse"``: ``t * log(mean_k exp(cos_k / t))``, a smooth maximum that lies between the mean and the
            maximum of the cosines (so the output stays in [-1, 1]) and sends gradient to every instance; it tends to
            the maximum as ``temperature`` goes to 0.
        temperature: ``t`` of the ``"lse"`` pooling; ignored by ``"max"``.
        eps: guards the normalisation of all-zero feature vectors (ReLU features can be exactly zero); such an
            instance has cosine 0 with every concept.

    Raises:
        ValueError: when a size is not positive, ``regularization`` is negative, ``pooling`` is unknown or
            ``temperature`` is not positive.

    Example::

        gcp = GlobalContrastPooling(in_features=512, num_concepts=256)
        feats = torch.randn(2, 64, 512)          # 2 bags of 64 instances
        mask = torch.ones(2, 64, dtype=torch.bool)
        pooled = gcp(feats, mask)                # (2, 256), values in [-1, 1]
    """

    def __init__(
        self,
        in_features: int,
        num_concepts: int,
        regularization: float = 0.0,
        pooling: str = "max",
        temperature: float = 0.1,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be a positive integer, got {in_features}.")
        if num_concepts < 1:
            raise ValueError(f"num_concepts must be a positive integer, got {num_concepts}.")
        if not regularization >= 0.0:  # also rejects NaN
            raise ValueError(f"regularization must be >= 0, got {regularization}.")
        if pooling not in GCP_POOLING_MODES:
            raise ValueError(f"pooling must be one of {GCP_POOLING_MODES}, got {pooling!r}.")
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}.")
        self.in_features = in_features
        self.num_concepts = num_concepts
        self.regularization = float(regularization)
        self.pooling = pooling
        self.temperature = float(temperature)
        self.eps = float(eps)
        # One concept per row. Only the direction matters (cosine), so the scale of the initialisation is free.
        self.concepts = nn.Parameter(torch.empty(num_concepts, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws the concepts uniformly at random on the unit sphere (random directions are nearly orthogonal)."""
        nn.init.normal_(self.concepts, mean=0.0, std=1.0 / math.sqrt(self.in_features))

    @torch.jit.export
    def similarity(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarity between every instance and every concept.

        Args:
            x: instance features, shape (B, N, D).

        Returns:
            cosines, shape (B, N, M), in [-1, 1].
        """
        x_unit = F.normalize(x, p=2.0, dim=-1, eps=self.eps)
        w_unit = F.normalize(self.concepts, p=2.0, dim=-1, eps=self.eps)
        return torch.matmul(x_unit, w_unit.t())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pools each bag.

        Args:
            x: instance features, shape (B, N, D).
            mask: optional bool (or 0/1) tensor of shape (B, N), True for real instances and False for padding;
                padded instances never contribute. A bag with no real instance pools to zeros.

        Returns:
            bag features, shape (B, M): for concept m the maximum (or smooth maximum) over the bag's instances of
            the cosine similarity with concept m.
        """
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected instance features of shape (B, N, {self.in_features}), got {list(x.shape)}.")
        cos = self.similarity(x)  # (B, N, M)
        valid = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"expected a mask of shape {list(x.shape[:2])}, got {list(mask.shape)}.")
            valid = mask.to(torch.bool)
        non_empty = valid.any(dim=1, keepdim=True)  # (B, 1)
        # A bag without real instances pools over all its (padded) instances and is zeroed at the end: this keeps
        # its values finite, as an all -inf row would give NaN gradients through logsumexp.
        valid = valid | ~non_empty
        valid3 = valid.unsqueeze(-1)  # (B, N, 1)
        # -inf keeps padded instances out of the max and out of the logsumexp (exactly, with zero gradient).
        neg_inf = torch.full_like(cos, float("-inf"))
        if self.pooling == "max":
            pooled = torch.where(valid3, cos, neg_inf).amax(dim=1)
        else:
            count = valid.sum(dim=1, keepdim=True).clamp(min=1).to(cos.dtype)  # (B, 1)
            logits = torch.where(valid3, cos / self.temperature, neg_inf)
            pooled = self.temperature * (torch.logsumexp(logits, dim=1) - torch.log(count))
        return torch.where(non_empty, pooled, torch.zeros_like(pooled))

    @torch.jit.export
    def regularization_loss(self) -> torch.Tensor:
        """Concept diversity penalty ``R``: ``regularization`` times the mean squared cosine between distinct concepts.

        It is 0 for mutually orthogonal concepts and ``regularization`` when all concepts coincide; it keeps the
        concepts from collapsing onto one direction, which would make the pooled features redundant.

        Returns:
            a scalar tensor (0 when ``regularization`` is 0 or there is a single concept), in the autograd graph of
            the concepts.
        """
        if self.regularization == 0.0 or self.num_concepts < 2:
            return self.concepts.sum() * 0.0
        w_unit = F.normalize(self.concepts, p=2.0, dim=-1, eps=self.eps)
        gram = torch.matmul(w_unit, w_unit.t())
        off_diagonal = gram - torch.diag_embed(torch.diagonal(gram))
        m = self.num_concepts
        return self.regularization * off_diagonal.pow(2).sum() / float(m * (m - 1))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_concepts={self.num_concepts}, pooling={self.pooling!r}, "
            f"temperature={self.temperature}, regularization={self.regularization}"
        )
