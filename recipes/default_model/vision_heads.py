"""Stage-1 losses: training-only heads on the vision tower (not saved with the model).

[CLS] multi-label prediction of what each view shows, per-patch colour / shape / glyph classes on the
feature layer the language model receives, the glyph classes of glyph sheets, and optionally a mark
on the patch holding each object's centre.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recipes.default_model.targets import LABELS, PATCH_FIELDS


def cls_loss(head: torch.nn.Module, pooled: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked multi-label BCE on [CLS] outputs. pooled (T, Dv), targets/mask (T, K)."""
    logits = head(pooled)  # (T, K)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


_NONE_WEIGHT = 0.1  # weight of the glyph field's "none" class: about 60 of a tile's 64 patches hold no glyph


class VisionHeads(torch.nn.Module):
    """Training-only heads on the vision tower: [CLS] multi-label, per-patch classes and (``centre``)
    the object-centre mark (not saved in the model)."""

    def __init__(self, width: int, centre: bool = False):
        super().__init__()
        self.cls = torch.nn.Linear(width, len(LABELS))
        self.sizes = [len(v) for v in PATCH_FIELDS.values()]
        self.patch = torch.nn.Linear(width, sum(self.sizes))
        self.centre = torch.nn.Linear(width, 1) if centre else None
        glyph_weight = torch.ones(len(PATCH_FIELDS["glyph"]))
        glyph_weight[-1] = _NONE_WEIGHT
        self.register_buffer("glyph_weight", glyph_weight, persistent=False)

    def loss(self, pooled: torch.Tensor, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """([CLS] loss, patch loss). pooled (T, Dv) [CLS] outputs, hidden (T, 1 + N, Dv) the feature layer."""
        cls = cls_loss(self.cls, pooled, batch["targets"], batch["mask"])
        feats = hidden[:, 1:]  # (T, N, Dv): what the LM sees
        logits = self.patch(feats).split(self.sizes, dim=-1)  # 3 x (T, N, C)
        target = batch["patch_targets"]  # (T, N, 3)
        weights = (None, None, self.glyph_weight)  # PATCH_FIELDS order: colour, shape, glyph
        losses = [F.cross_entropy(lg.flatten(0, 1), target[..., k].flatten(), weight=weights[k], ignore_index=-100)
                  for k, lg in enumerate(logits)]
        return cls, sum(losses) / len(losses)

    def centre_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of "this patch holds an object's centre" on the feature layer.
        hidden (T, 1 + N, Dv), targets (T, N) bool (``targets.centre_targets``)."""
        logits = self.centre(hidden[:, 1:])[..., 0]  # (T, N)
        return F.binary_cross_entropy_with_logits(logits, targets.float())

    def sheet_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Glyph classification on every patch of glyph sheets. hidden (S, 1 + N, Dv), targets (S, N)."""
        glyph = self.patch(hidden[:, 1:]).split(self.sizes, dim=-1)[2]  # (S, N, C)
        return F.cross_entropy(glyph.flatten(0, 1), targets.flatten(), weight=self.glyph_weight, ignore_index=-100)
