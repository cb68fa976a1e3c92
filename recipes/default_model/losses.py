"""Stage-2 losses besides the language-model loss: the projector's word alignment, and the grounding
and tally losses on two attention heads of one LM layer (their rows from
``tokendrop.scoring.query_attention_rows``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def align_loss(projected: torch.Tensor, embeddings: torch.Tensor, targets: torch.Tensor, ids: list[torch.Tensor]):
    """Word alignment of the projector's output (the role of LLaVA's feature-alignment stage).

    Each object patch's projected feature, scored against the (tied) word embeddings of the colours,
    shapes and glyphs, must pick its own colour, shape and glyph word: cross-entropy within each
    field. projected (T, N, D), embeddings (vocab, D), targets (T, N, 3) patch classes (-100 ignored,
    the last class of a field = "none", not aligned).
    """
    losses = []
    for k, field_ids in enumerate(ids):
        target = targets[..., k]
        keep = (target >= 0) & (target < len(field_ids))  # object / glyph patches only
        if keep.any():
            logits = projected[keep] @ embeddings[field_ids].T  # (M, C)
            losses.append(F.cross_entropy(logits, target[keep]))
    return sum(losses) / max(1, len(losses))


def tally_loss(rows: torch.Tensor, query: torch.Tensor, target: torch.Tensor, counts: torch.Tensor,
               valid: torch.Tensor, balance: bool = False) -> torch.Tensor:
    """Cross-entropy of the tally head's attention, coarsened to (itself, the matching objects, the rest),
    against (1 / (n + 1), n / (n + 1), 0) for n matching objects.

    The head's output then carries n: its share of the query's own value vector is 1 / (n + 1), so
    "how many" and "is there" become a read-out of one number. rows (B, Q, L) softmax rows of one
    head, query (B, Q) their positions, target (B, Q, L) bool the matching objects' image tokens,
    counts (B, Q) float n, valid (B, Q) bool. ``balance``: every count present in the batch weighs the
    same (the mean over counts of the mean loss per count), as n >= 2 is rare next to n = 0 and 1.
    """
    own = rows.gather(-1, query[..., None])[..., 0].clamp(min=1e-6)  # (B, Q)
    mass = (rows * target).sum(dim=-1).clamp(min=1e-6)  # (B, Q)
    share = counts / (counts + 1)
    loss = -((1 - share) * own.log() + share * mass.log())
    if not balance:
        return (loss * valid).sum() / valid.sum().clamp(min=1)
    per_n = [loss[valid & (counts == n)].mean() for n in counts[valid].unique()]  # one mean per count
    return torch.stack(per_n).mean() if per_n else loss.sum() * 0


def ground_loss(rows: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """-log of the attention mass an answer's query puts on the patches the answer is about.

    rows (B, Q, L) softmax rows of one head, target (B, Q, L) bool, valid (B, Q) bool.
    """
    mass = (rows * target).sum(dim=-1).clamp(min=1e-6)  # (B, Q)
    return -(mass.log() * valid).sum() / valid.sum().clamp(min=1)
