"""DA-CMIL's instance-to-bag contrastive loss and the combined DA-CMIL training loss.

Chikontwe et al. 2020 (medRxiv 2020.09.14.20194654), Eq. 5: each instance feature of a patient is a "view" of that
patient; it is pulled towards its own bag feature and pushed from the other bags of the mini-batch, with cosine
similarity and a temperature in the NT-Xent style. Total loss: ``lam * CE + (1 - lam) * contrastive``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CONTRASTIVE_NEGATIVES", "SINGLE_BAG_MODES", "DACMILLoss", "InstanceBagContrastiveLoss"]

CONTRASTIVE_NEGATIVES = ("other_bags", "other_bags_and_instances")
SINGLE_BAG_MODES = ("align", "zero")
_REDUCTIONS = ("mean", "sum", "none")


class InstanceBagContrastiveLoss(nn.Module):
    """Contrastive loss between the instances of each bag and the bag features of a mini-batch.

    With ``z'_bn`` the l2-normalised feature of instance ``n`` of bag ``b``, ``z_c`` the l2-normalised feature of bag
    ``c`` and ``s(u, v) = u . v / tau`` (cosine similarity over the temperature), the loss of one instance is the
    cross-entropy of its similarities with its own bag as the target::

        l_bn = -s(z'_bn, z_b) + log( sum_{c} exp(s(z'_bn, z_c)) + sum_{negative instances j} exp(s(z'_bn, z'_j)) )

    The paper's Eq. 5 does not pin down which mini-batch entries are negatives; ``negatives`` chooses:

    - ``"other_bags"`` (default): the denominator holds the instance's similarity to every bag feature of the
      mini-batch (its own bag, the positive, and the other bags, the negatives); no instance-instance terms.
    - ``"other_bags_and_instances"``: also the instances of the other bags as negatives (as in NT-Xent, where every
      other entry of the batch is a negative). The instances of the same bag are never negatives: they are views of
      the same patient.

    Bags with no real instance (all-False mask row) are ignored, as instances and as negatives.

    A mini-batch of one bag (batch size 1, or a last incomplete batch) has no negatives: the cross-entropy above is
    identically 0 (``log 1``) and gives no gradient. ``single_bag`` says what to do then:

    - ``"align"`` (default): the alignment term only, ``l_bn = (1 - cos(z'_bn, z_b)) / tau``, which still pulls the
      instances towards their bag (the positive half of the loss), is 0 when they agree and at most ``2 / tau``.
    - ``"zero"``: a zero loss (connected to the graph so ``backward`` works) that leaves the model untouched.

    Args:
        temperature: ``tau > 0`` (the paper uses 1.0).
        negatives: ``"other_bags"`` or ``"other_bags_and_instances"``, see above.
        single_bag: ``"align"`` or ``"zero"``, see above.
        reduction: ``"mean"`` over all real instances of the batch, ``"sum"``, or ``"none"`` for the per-instance
            losses ``(B, N)`` (0 on padding).

    Raises:
        ValueError: for a non-positive temperature or an unknown option.

    Example::

        >>> loss = InstanceBagContrastiveLoss(temperature=1.0)
        >>> loss(torch.randn(4, 8, 512), torch.randn(4, 512))
        tensor(...)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        negatives: str = "other_bags",
        single_bag: str = "align",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}.")
        if negatives not in CONTRASTIVE_NEGATIVES:
            raise ValueError(f"negatives must be one of {CONTRASTIVE_NEGATIVES}, got {negatives!r}.")
        if single_bag not in SINGLE_BAG_MODES:
            raise ValueError(f"single_bag must be one of {SINGLE_BAG_MODES}, got {single_bag!r}.")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
        self.temperature = float(temperature)
        self.negatives = negatives
        self.single_bag = single_bag
        self.reduction = reduction

    def forward(
        self, instance_features: torch.Tensor, bag_features: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            instance_features: ``(B, N, D)``, instance features before instance pooling (after spatial pooling).
                Scaling an instance by its attention weight does not change its cosine similarities, so the
                paper's "attention-weighted instance features" give the same loss.
            bag_features: ``(B, D)``.
            mask: optional bool ``(B, N)``, ``True`` for real instances.

        Returns:
            a scalar, or ``(B, N)`` with ``reduction="none"``.

        Raises:
            ValueError: on inconsistent shapes.
        """
        if instance_features.dim() != 3 or bag_features.dim() != 2:
            raise ValueError(
                "expected instance_features (B, N, D) and bag_features (B, D), got shapes "
                f"{list(instance_features.shape)} and {list(bag_features.shape)}."
            )
        b, n, d = instance_features.shape
        if bag_features.shape[0] != b or bag_features.shape[1] != d:
            raise ValueError(f"bag_features shape {list(bag_features.shape)} does not match (B, D) = {[b, d]}.")
        if mask is None:
            mask = torch.ones((b, n), dtype=torch.bool, device=instance_features.device)
        else:
            if mask.shape != (b, n):
                raise ValueError(f"mask shape {list(mask.shape)} does not match (B, N) = {[b, n]}.")
            mask = mask.to(device=instance_features.device, dtype=torch.bool)

        tau = self.temperature
        z_inst = F.normalize(instance_features, dim=-1)  # (B, N, D)
        z_bag = F.normalize(bag_features, dim=-1)  # (B, D)
        valid_bag = mask.any(dim=1)  # (B,)
        # Cosine similarity of each instance to its own bag: the positive pair.
        positive = (z_inst * z_bag.unsqueeze(1)).sum(dim=-1) / tau  # (B, N)

        if int(valid_bag.sum()) < 2:
            if self.single_bag == "align":
                per_instance = (1.0 / tau) - positive
            else:
                per_instance = positive * 0.0  # keeps the graph so backward() works
        else:
            # Instance-to-bag similarities (B, N, B); bags without instances are no candidates.
            to_bags = torch.einsum("bnd,cd->bnc", z_inst, z_bag) / tau
            to_bags = to_bags.masked_fill(~valid_bag.view(1, 1, b), float("-inf"))
            candidates = [to_bags]
            if self.negatives == "other_bags_and_instances":
                # Instance-to-instance similarities (B, N, B*N); keep only real instances of other bags.
                to_inst = torch.einsum("bnd,cmd->bncm", z_inst, z_inst) / tau
                other_bag = ~torch.eye(b, dtype=torch.bool, device=mask.device)  # (B, C)
                keep = other_bag.view(b, 1, b, 1) & mask.view(1, 1, b, n)
                candidates.append(to_inst.masked_fill(~keep, float("-inf")).reshape(b, n, b * n))
            logits = torch.cat(candidates, dim=-1)
            per_instance = torch.logsumexp(logits, dim=-1) - positive

        per_instance = per_instance.masked_fill(~mask, 0.0)
        if self.reduction == "none":
            return per_instance
        total = per_instance.sum()
        if self.reduction == "sum":
            return total
        return total / mask.sum().clamp_min(1)


class DACMILLoss(nn.Module):
    """DA-CMIL training loss: ``lam * CE(bag logits, labels) + (1 - lam) * contrastive``.

    ``lam = 1`` gives the bag cross-entropy alone (the paper's "without L_F" ablation); the contrastive term is then
    still computed for logging but carries no gradient weight.

    After each call the two terms (detached) are in :attr:`last_terms` (``{"ce": ..., "contrastive": ...}``) for
    logging; :meth:`terms` returns all three with their graphs.

    Args:
        lam: weight ``lambda`` in ``[0, 1]`` of the cross-entropy (0.5 in the paper).
        temperature: contrastive temperature ``tau > 0`` (1.0 in the paper).
        negatives: see :class:`InstanceBagContrastiveLoss`.
        single_bag: see :class:`InstanceBagContrastiveLoss`.
        class_weight: optional per-class weights for the cross-entropy (e.g. for an imbalanced cohort).

    Raises:
        ValueError: when ``lam`` is outside ``[0, 1]`` or an option of the contrastive loss is invalid.

    Example::

        >>> loss_fn = DACMILLoss(lam=0.5)
        >>> out = net.forward_features(bags, mask)
        >>> loss = loss_fn(out["logits"], labels, out["instance_features"], out["bag_features"], out["mask"])
    """

    def __init__(
        self,
        lam: float = 0.5,
        temperature: float = 1.0,
        negatives: str = "other_bags",
        single_bag: str = "align",
        class_weight: torch.Tensor | list[float] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be a number in [0, 1], got {lam!r}.")
        self.lam = float(lam)
        self.contrastive = InstanceBagContrastiveLoss(temperature, negatives=negatives, single_bag=single_bag)
        self.cross_entropy = nn.CrossEntropyLoss(
            weight=None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32)
        )
        self.last_terms: dict[str, torch.Tensor] = {}

    def terms(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        instance_features: torch.Tensor,
        bag_features: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The total loss and its two terms.

        Args:
            logits: bag logits ``(B, K)``.
            labels: class indices ``(B,)`` or ``(B, 1)``.
            instance_features: ``(B, N, D)``.
            bag_features: ``(B, D)``.
            mask: optional bool ``(B, N)``.

        Returns:
            ``{"loss": total, "ce": cross-entropy, "contrastive": contrastive}`` (scalars, with graphs).
        """
        labels = labels.reshape(-1).long()
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(f"got {labels.shape[0]} labels for {logits.shape[0]} bags.")
        ce = self.cross_entropy(logits, labels)
        contrastive = self.contrastive(instance_features, bag_features, mask)
        total = self.lam * ce + (1.0 - self.lam) * contrastive
        self.last_terms = {"ce": ce.detach(), "contrastive": contrastive.detach()}
        return {"loss": total, "ce": ce, "contrastive": contrastive}

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        instance_features: torch.Tensor,
        bag_features: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The total loss (see :meth:`terms` for the arguments); the terms are left in :attr:`last_terms`."""
        return self.terms(logits, labels, instance_features, bag_features, mask)["loss"]
