"""DART: keep the image tokens least like a few pivot tokens, once, before layer K of the LLM.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More", arXiv 2502.11494. Reference code: github.com/ZichenWen1/DART @ 5a19452fc173 (LLaVA path:
`llava/model/language_model/modeling_llama_self.py`, `DART.get_retained_image_token`; the
Qwen2.5-VL port in the same commit runs the same selection).

Layers 0..K-1 see every token. Before layer K (prefill only), for a sample with N image tokens:
  1. pivots: the `pivot_image_token` image tokens and the `pivot_text_token` text tokens after the
     image with the largest L1 norm of layer K-1's keys after RoPE (heads concatenated);
  2. similarity: cosine of the hidden states entering layer K passed through the LLM's final norm;
  3. keep M = round(N * (1 - drop)) image tokens: the image pivots, then each of the P pivots, in
     ascending sequence index, takes its quota of the still-free image tokens LEAST similar to it:
     (M - image pivots) // P each, the first (M - image pivots) % P pivots one more;
  4. text stays; kept tokens keep their ORIGINAL position ids; the keep set is fixed while decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.lazy import torch
from tokendrop.methods.base import POSITION_RULES, InLLMMethod, check_choice, check_int, check_number, set_field

K = 2  # the official pruned layer
DROP = 0.778  # the official reduction_ratio
PIVOT_IMAGE = 4  # the official pivot_image_token
PIVOT_TEXT = 4  # the official pivot_text_token


@dataclass(frozen=True)
class DART(InLLMMethod):
    """Drop duplicated image tokens once, before layer k: keep those least similar to a few pivots.

    Attributes:
        k: layers 0..k-1 see every token; from layer k on only the kept ones. Must be in [0, depth);
            k = 0 reads layer 0's keys and the embeddings (there is no layer before it).
        drop: the fraction of image tokens DROPPED, in [0, 1); round(N * (1 - drop)) are kept.
        pivot_image_token: image pivots (kept themselves), an int >= 0.
        pivot_text_token: text pivots among the tokens after the sample's last image token, an int >= 0.
        positions: "original" (kept tokens keep their position ids, official) or "renumber".

    Edge cases (decided here; the official code is batch 1 and crashes or over-keeps instead):
      - fewer text tokens after the image than `pivot_text_token` (none when the prompt ends with its
        image): the ones there are are the text pivots, and P shrinks accordingly;
      - M <= `pivot_image_token`: the top M image tokens by key norm are kept, no similarity step;
      - no pivot at all (pivot_image_token = 0 and no text pivot): the top M image tokens by key
        norm are kept;
      - padding is never a pivot nor a candidate; each sample chooses among its own tokens only;
      - pivots never coincide (image and text pivots are disjoint) and no image token is taken twice:
        each pivot chooses among the image tokens neither a pivot nor taken by an earlier pivot;
      - several images in a sample are one pool; "after the image" is after the last image token;
      - a prompt that ends with an image token: that token is the query, which the engine always
        keeps (as for every in-LLM method); it fills the slot of DART's last-chosen token if DART
        did not choose it.

    Deviations from the official code:
      - Exact counts: M = round(N * (1 - drop)) per sample (official: `max_num_trunction` // P per
        pivot, 4 + 8 * 16 = 132 on LLaVA-1.5 whatever the ratio; LLaVA-NeXT's own cap), the quotas
        spread the remainder; pivots in ascending sequence index (official: a Python set's order).
      - Ties (key norms, similarities) go to the lower index (official: torch.topk's order).
      - Key norms from the keys before grouped-query repetition (official: after; the norms are a
        constant multiple, the ranking is the same); norms and cosines in fp32.
      - Batches with padding (official: batch 1, asserted); any image position (official: a fixed
        start index and length from the command line); k = 0 allowed (see `k`); positions="renumber"
        offered as for FastV (official: original positions only).
    """

    k: int = K
    drop: float = DROP
    pivot_image_token: int = PIVOT_IMAGE
    pivot_text_token: int = PIVOT_TEXT
    positions: str = "original"

    name = "dart"

    def __post_init__(self):
        set_field(self, "k", check_int("k", self.k, 0, allowed="an int in [0, depth)"))
        set_field(self, "drop", check_number("drop", self.drop, 0.0, 1.0, high_open=True))
        set_field(self, "pivot_image_token", check_int("pivot_image_token", self.pivot_image_token, 0))
        set_field(self, "pivot_text_token", check_int("pivot_text_token", self.pivot_text_token, 0))
        check_choice("positions", self.positions, POSITION_RULES)

    def boundaries(self, depth: int) -> tuple[int, ...]:
        if self.k >= depth:
            raise ValueError(f"k must be in [0, {depth}) for a {depth}-layer LLM, got {self.k}")
        return (self.k,)

    def keep_counts(self, n: int, depth: int) -> list[tuple[int, int]]:
        return [(self.boundaries(depth)[0], round(n * (1 - self.drop)))]  # 3. M (Python's round)

    def layer_fractions(self, depth: int) -> list[float]:
        return [1.0 if layer < self.boundaries(depth)[0] else 1 - self.drop for layer in range(depth)]

    def ranking_layer(self, boundary: int) -> int:
        return boundary - 1 if boundary > 0 else boundary  # 1. layer K-1's keys (layer 0's when K = 0)

    def rank(self, boundary: int, view) -> torch.Tensor:
        """(B, L) scores whose top M per sample are DART's choice: chosen tokens score M, M-1, ..., 1
        in the order chosen, the others 0 (the engine keeps the top M, ties to the lower index)."""
        from tokendrop.scoring import rotary_keys

        layer = self.ranking_layer(boundary)
        norms = rotary_keys(view.layers[layer], view.inputs(layer), view.rotary(layer)).abs().sum(dim=-1)  # (B, L)
        states = view.norm(view.inputs(boundary)).float()  # 2. (B, L, D) entering layer K, final norm
        scores = torch.zeros(norms.shape, dtype=torch.float32, device=norms.device)
        after = torch.arange(norms.shape[1], device=norms.device)
        for b in range(norms.shape[0]):
            image = view.image[b].nonzero().squeeze(1)  # (N,)
            if image.numel() == 0:
                continue
            text = (view.mask[b] & ~view.image[b] & (after > image[-1])).nonzero().squeeze(1)  # (T,)
            keep = dict(self.keep_counts(image.numel(), len(view.layers)))[boundary]
            chosen = self.select(norms[b, image], norms[b, text], states[b, image], states[b, text], keep)
            scores[b, image[chosen]] = torch.arange(len(chosen), 0, -1, dtype=torch.float32, device=scores.device)
        return scores

    def select(self, image_norms, text_norms, image_states, text_states, keep: int) -> torch.Tensor:
        """Indices into the N image tokens, `keep` of them, in the order DART chooses them.

        Args:
            image_norms: (N,) L1 norms of the image tokens' keys; text_norms: (T,) of the text after it.
            image_states: (N, D) and text_states: (T, D), the (normed) states compared by cosine.
            keep: M, in [0, N].
        """
        by_norm = torch.argsort(image_norms, descending=True, stable=True)  # ties: lower index first
        image_pivots = by_norm[: self.pivot_image_token].sort().values  # 1. (ascending sequence index)
        text_pivots = torch.argsort(text_norms, descending=True, stable=True)[: self.pivot_text_token].sort().values
        pivots = torch.cat([image_states[image_pivots], text_states[text_pivots]])  # (P, D) image before text
        if keep <= len(image_pivots) or len(pivots) == 0:
            return by_norm[:keep]
        taken = torch.zeros(len(image_norms), dtype=torch.bool, device=image_norms.device)
        taken[image_pivots] = True
        chosen = [image_pivots]
        share, extra = divmod(keep - len(image_pivots), len(pivots))  # 3. the quotas
        for p, pivot in enumerate(pivots):
            similarity = torch.nn.functional.cosine_similarity(pivot[None], image_states, dim=-1)  # (N,)
            similarity = similarity.masked_fill(taken, float("inf"))
            least = torch.argsort(similarity, stable=True)[: share + (p < extra)]
            taken[least] = True
            chosen.append(least)
        return torch.cat(chosen)
