"""The multi-task loss of M2UNet (He et al., arXiv 2005.03832, Eq. 3-5).

    L = lam * CE(severity logits, severity labels) + L_seg,    L_seg = CE + (1 - Dice) over the lobe classes,

with ``lam = 0.01``. Most scans have no lobe labels (152 of 666 in the paper), so ``L_seg`` is computed only on the
bags that have them, and averaged over those bags only: in a mini-batch with one labelled bag out of four, the
segmentation term is that bag's loss, not a quarter of it. With no labelled bag it is 0 (a tensor still attached to
the graph, so that every parameter receives a gradient, as distributed data parallel expects).

Reading of "averaged over patches and classes" (Eq. 4): for each labelled patch, the pixel-mean cross-entropy plus
the class-mean soft Dice loss; then the mean over the bag's labelled patches, then the mean over labelled bags. The
soft Dice follows MONAI ``DiceLoss`` (softmax, one-hot target, ``1 - (2 I + smooth_nr) / (P + G + smooth_dr)``), but is
written here so that padded patches and ignored pixels can be left out exactly; ``dice_over="bag"`` computes the Dice
of each class over the whole bag instead of per patch (steadier when a patch holds few lobes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["M2UNetLoss"]

DICE_REDUCTIONS = ("patch", "bag")


class M2UNetLoss(nn.Module):
    """``lam`` x severity cross-entropy + (cross-entropy + Dice) lobe segmentation over labelled bags only.

    Args:
        lam: weight of the severity cross-entropy (the paper's lambda, 0.01).
        include_background_in_dice: whether class 0 (background) enters the Dice average (the paper averages over
            all classes).
        lambda_ce: weight of the segmentation cross-entropy.
        lambda_dice: weight of the segmentation Dice loss.
        dice_over: ``"patch"`` (the paper: Dice of each patch, averaged over patches) or ``"bag"`` (Dice of each
            bag's patches taken together).
        smooth_nr: added to the Dice numerator (as MONAI ``DiceLoss``).
        smooth_dr: added to the Dice denominator.
        ignore_index: lobe label value of pixels without annotation; they count in neither term. A bag whose
            pixels all carry it counts as unlabelled, so a collated batch may fill missing lobe maps with it.
        class_weight: optional weights of the severity classes for the cross-entropy (e.g. to balance severe
            cases when they are not oversampled).
        regularization_weight: multiplies the regulariser passed to :meth:`forward` (e.g.
            ``network.regularization_loss()``, which already carries the GCP ``regularization`` weight).

    Raises:
        ValueError: for a negative weight, an unknown ``dice_over``, negative smoothing or bad class weights.

    Example::

        loss_fn = M2UNetLoss(lam=0.01)
        class_logits, seg_logits = network(bags)              # (B, 2), (B, N, 6, H, W)
        terms = loss_fn.terms(class_logits, labels, seg_logits, lobes, has_lobes=has_lobes,
                              regularization=network.regularization_loss())
        terms["loss"].backward()
    """

    def __init__(
        self,
        lam: float = 0.01,
        include_background_in_dice: bool = True,
        lambda_ce: float = 1.0,
        lambda_dice: float = 1.0,
        dice_over: str = "patch",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        ignore_index: int = -1,
        class_weight: Sequence[float] | None = None,
        regularization_weight: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("lam", lam),
            ("lambda_ce", lambda_ce),
            ("lambda_dice", lambda_dice),
            ("smooth_nr", smooth_nr),
            ("smooth_dr", smooth_dr),
            ("regularization_weight", regularization_weight),
        ):
            if not value >= 0.0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if dice_over not in DICE_REDUCTIONS:
            raise ValueError(f"dice_over must be one of {DICE_REDUCTIONS}, got {dice_over!r}.")
        self.lam = float(lam)
        self.include_background_in_dice = bool(include_background_in_dice)
        self.lambda_ce = float(lambda_ce)
        self.lambda_dice = float(lambda_dice)
        self.dice_over = dice_over
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.ignore_index = int(ignore_index)
        self.regularization_weight = float(regularization_weight)
        weight = None
        if class_weight is not None:
            weight = torch.as_tensor(list(class_weight), dtype=torch.float32)
            if weight.dim() != 1 or weight.numel() < 2 or bool((weight < 0).any()):
                raise ValueError(f"class_weight must be >= 0, one value per class, got {list(class_weight)}.")
        self.register_buffer("class_weight", weight)

    # ------------------------------------------------------------------------------------------------------- terms
    def classification_loss(self, class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the severity logits (B, K) against integer labels (B,) or (B, 1); mean over bags."""
        if class_logits.dim() != 2:
            raise ValueError(f"expected class logits of shape (B, K), got {list(class_logits.shape)}.")
        target = labels.reshape(-1).long()
        if target.numel() != class_logits.shape[0]:
            raise ValueError(
                f"expected {class_logits.shape[0]} severity labels, got labels of shape {list(labels.shape)}."
            )
        return F.cross_entropy(class_logits.float(), target, weight=self.class_weight)

    def segmentation_terms(
        self,
        seg_logits: torch.Tensor,
        lobes: torch.Tensor,
        has_lobes: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Segmentation cross-entropy and Dice, averaged over labelled bags only.

        Args:
            seg_logits: (B, N, C, H, W) logits.
            lobes: (B, N, H, W) or (B, N, 1, H, W) integer labels in [0, C), or ``ignore_index``.
            has_lobes: optional bool (B,), False for bags without lobe labels (whatever ``lobes`` holds there).
            mask: optional bool (B, N), False for padded patches.

        Returns:
            ``{"seg_ce", "seg_dice", "segmentation", "labelled_bags"}``: the two weighted-free terms, their weighted
            sum ``lambda_ce * seg_ce + lambda_dice * seg_dice`` and the number of bags that counted (a tensor). All
            are 0 (still in the graph of ``seg_logits``) when no bag is labelled.
        """
        if seg_logits.dim() != 5:
            raise ValueError(f"expected segmentation logits of shape (B, N, C, H, W), got {list(seg_logits.shape)}.")
        b, n, c, h, w = seg_logits.shape
        if lobes.dim() == 5 and lobes.shape[2] == 1:
            lobes = lobes[:, :, 0]
        if tuple(lobes.shape) != (b, n, h, w):
            raise ValueError(
                f"expected lobe labels of shape {[b, n, h, w]} or {[b, n, 1, h, w]}, got {list(lobes.shape)}."
            )
        lobes = lobes.long()
        valid_pixels = lobes != self.ignore_index  # (B, N, H, W)
        if mask is not None:
            if tuple(mask.shape) != (b, n):
                raise ValueError(f"expected a patch mask of shape {[b, n]}, got {list(mask.shape)}.")
            valid_pixels = valid_pixels & mask.to(device=lobes.device, dtype=torch.bool)[:, :, None, None]
        if has_lobes is not None:
            if has_lobes.numel() != b:
                raise ValueError(f"expected has_lobes of shape ({b},), got {list(has_lobes.shape)}.")
            valid_pixels = (
                valid_pixels & has_lobes.reshape(b).to(device=lobes.device, dtype=torch.bool)[:, None, None, None]
            )
        # Checked on the pixels that count only: unlabelled bags may hold anything (e.g. a zero-filled map).
        if bool((((lobes < 0) | (lobes >= c)) & valid_pixels).any()):
            raise ValueError(f"lobe labels must lie in [0, {c}) or equal ignore_index={self.ignore_index}.")

        logits = seg_logits.float()
        pixel_weight = valid_pixels.to(logits.dtype)  # (B, N, H, W)
        patch_pixels = pixel_weight.sum(dim=(2, 3))  # (B, N)
        patch_labelled = patch_pixels > 0
        bag_labelled = patch_labelled.any(dim=1)  # (B,)
        patch_weight = patch_labelled.to(logits.dtype)

        # Cross-entropy: pixel mean within each patch, then patch mean within each bag.
        safe_target = torch.where(valid_pixels, lobes, torch.zeros_like(lobes))
        ce_pixels = F.cross_entropy(logits.flatten(0, 1), safe_target.flatten(0, 1), reduction="none").view(b, n, h, w)
        ce_patch = (ce_pixels * pixel_weight).sum(dim=(2, 3)) / patch_pixels.clamp(min=1.0)
        ce_bag = (ce_patch * patch_weight).sum(dim=1) / patch_weight.sum(dim=1).clamp(min=1.0)

        # Soft Dice over the valid pixels: ignored pixels and padded patches are zeroed in prediction and target.
        probs = torch.softmax(logits, dim=2) * pixel_weight[:, :, None]
        onehot = F.one_hot(safe_target, c).permute(0, 1, 4, 2, 3).to(logits.dtype) * pixel_weight[:, :, None]
        if not self.include_background_in_dice:
            probs, onehot = probs[:, :, 1:], onehot[:, :, 1:]
        sum_dims = (3, 4) if self.dice_over == "patch" else (1, 3, 4)
        intersection = (probs * onehot).sum(dim=sum_dims)
        denominator = probs.sum(dim=sum_dims) + onehot.sum(dim=sum_dims)
        dice_loss = 1.0 - (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)
        if self.dice_over == "patch":  # (B, N, C'): class mean per patch, then mean over labelled patches
            dice_bag = (dice_loss.mean(dim=2) * patch_weight).sum(dim=1) / patch_weight.sum(dim=1).clamp(min=1.0)
        else:  # (B, C'): class mean per bag
            dice_bag = dice_loss.mean(dim=1)

        bag_weight = bag_labelled.to(logits.dtype)
        labelled = bag_weight.sum()
        # Mean over labelled bags only; without any, the sum is an exact 0 that keeps the graph (and DDP) intact.
        seg_ce = (ce_bag * bag_weight).sum() / labelled.clamp(min=1.0)
        seg_dice = (dice_bag * bag_weight).sum() / labelled.clamp(min=1.0)
        return {
            "seg_ce": seg_ce,
            "seg_dice": seg_dice,
            "segmentation": self.lambda_ce * seg_ce + self.lambda_dice * seg_dice,
            "labelled_bags": labelled.detach(),
        }

    def terms(
        self,
        class_logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        seg_logits: torch.Tensor | None = None,
        lobes: torch.Tensor | None = None,
        has_lobes: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        regularization: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """All terms, for logging.

        Args:
            class_logits: (B, K) severity logits, or ``None`` for a segmentation-only network.
            labels: (B,) severity labels; needed with ``class_logits``.
            seg_logits: (B, N, C, H, W) lobe logits, or ``None`` (classification-only network or no decoder run).
            lobes: lobe labels (see :meth:`segmentation_terms`), or ``None`` when no bag of the batch has any.
            has_lobes: optional bool (B,), False for bags without lobe labels.
            mask: optional bool (B, N), False for padded patches.
            regularization: optional scalar added with ``regularization_weight``, e.g.
                ``network.regularization_loss()`` (the GCP concept regulariser).

        Returns:
            ``{"loss", "classification", "segmentation", "seg_ce", "seg_dice", "regularization", "labelled_bags"}``:
            ``loss = lam * classification + segmentation + regularization_weight * regularization``; absent terms
            are 0.
        """
        if class_logits is not None:
            zero = class_logits.new_zeros((), dtype=torch.float32)
        elif seg_logits is not None:
            zero = seg_logits.new_zeros((), dtype=torch.float32)
        else:
            raise ValueError("at least one of class_logits and seg_logits is needed.")

        classification = zero
        if class_logits is not None:
            if labels is None:
                raise ValueError("labels are needed with class_logits.")
            classification = self.classification_loss(class_logits, labels)

        seg = {"seg_ce": zero, "seg_dice": zero, "segmentation": zero, "labelled_bags": zero}
        if seg_logits is not None:
            if lobes is None:
                # No labels at all: 0, attached to the decoder's graph.
                attached = seg_logits.float().sum() * 0.0
                seg = {"seg_ce": attached, "seg_dice": attached, "segmentation": attached, "labelled_bags": zero}
            else:
                seg = self.segmentation_terms(seg_logits, lobes, has_lobes=has_lobes, mask=mask)

        reg = zero if regularization is None else regularization.float()
        loss = self.lam * classification + seg["segmentation"] + self.regularization_weight * reg
        return {
            "loss": loss,
            "classification": classification,
            "segmentation": seg["segmentation"],
            "seg_ce": seg["seg_ce"],
            "seg_dice": seg["seg_dice"],
            "regularization": reg,
            "labelled_bags": seg["labelled_bags"],
        }

    def forward(
        self,
        class_logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        seg_logits: torch.Tensor | None = None,
        lobes: torch.Tensor | None = None,
        has_lobes: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        regularization: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The total loss (a scalar); see :meth:`terms` for the arguments."""
        return self.terms(class_logits, labels, seg_logits, lobes, has_lobes, mask, regularization)["loss"]
