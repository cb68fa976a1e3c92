"""PyramidDrop: drop image tokens stage by stage inside the LLM.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", arXiv 2410.17247 (CVPR 2025). Reference code: github.com/Cooperx521/PyramidDrop.

The LLM's layers are split into S stages at boundary layers (8, 16, 24 for a 32-layer LLM). At the
start of stage s (prefill only):
  1. rank the image tokens by the attention the last instruction token pays them: softmax of its
     query over all keys (fp32, RoPE at the current positions), mean over heads, image columns;
  2. keep the top int(N * lambda**s) of the ORIGINAL N image tokens, in their order; text stays;
  3. renumber the positions contiguously (official code).
The keep sets are fixed at prefill; decoding reuses them (each layer's cache holds what it saw).
Training uses the same forward; there the queries are the tokens just before each answer span,
their rows averaged, and the selection is a hard top-k on detached scores (no gradient through it).

Deviations from the paper and the official code:
  - score_layer="next" (default) ranks with the first layer of the next stage, as the official code
    does; the paper's text says the stage's last layer ("last").
  - On M-RoPE models (Qwen-VL) kept tokens keep their original 3-D positions (step 3 would destroy
    them); positions="renumber" is refused there.
  - The query is never dropped: a last prompt token that is itself an image token (a prompt ending
    with its image) is kept and counts as one of the kept image tokens (docs/design.md).
  - Grouped-query attention, padded batches (each sample its own keep set, from its own N) and
    several images per sample (ranked as one pool) work; the official code has none of these.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokendrop.methods.base import POSITION_RULES, InLLMMethod, check_choice, check_int, check_number, set_field

LAMBDA = 0.5  # the paper's keep ratio per stage
STAGES = 4  # the paper's S: boundaries at depth/4, depth/2, 3*depth/4


@dataclass(frozen=True)
class PyramidDrop(InLLMMethod):
    """Drop image tokens at stage boundaries inside the LLM.

    Attributes:
        layers: stage boundaries, strictly increasing in [1, depth); None means depth/4, depth/2,
            3*depth/4 ([8, 16, 24] for 32 layers).
        ratio: lambda in (0, 1]; stage s keeps int(N * ratio**s) of the ORIGINAL N image tokens.
        score_layer: "next" scores with the first layer of the next stage (official code);
            "last" with the stage's last layer (paper text).
        positions: "renumber" (positions contiguous after each drop, official) or "original"; None
            (default): "renumber" on 1-D rotary models, "original" on M-RoPE models (Qwen-VL), whose
            3-D positions cannot be renumbered.
    """

    layers: tuple[int, ...] | None = None
    ratio: float = LAMBDA
    score_layer: str = "next"
    positions: str | None = None

    name = "pdrop"

    def __post_init__(self):
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                raise TypeError(f"layers must be a non-empty sequence of ints or None, got {self.layers!r}")
            layers = tuple(check_int("layers", x, -(2**31)) for x in self.layers)
            if any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 1:
                raise ValueError(f"layers must be strictly increasing and >= 1, got {list(layers)}")
            set_field(self, "layers", layers)
        set_field(self, "ratio", check_number("ratio", self.ratio, 0.0, 1.0, low_open=True))
        check_choice("score_layer", self.score_layer, ("next", "last"))
        check_choice("positions", self.positions, (None, *POSITION_RULES))

    def boundaries(self, depth: int) -> tuple[int, ...]:
        layers = self.layers or tuple(s * depth // STAGES for s in range(1, STAGES))
        if layers[0] < 1 or layers[-1] >= depth or any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"layers must be strictly increasing in [1, {depth}) for a {depth}-layer LLM, got {list(layers)}")
        return tuple(layers)

    def keep_counts(self, n: int, depth: int) -> list[tuple[int, int]]:
        # 2. stage s keeps int(N * lambda**s) of the original N
        return [(layer, int(n * self.ratio ** (s + 1))) for s, layer in enumerate(self.boundaries(depth))]

    def layer_fractions(self, depth: int) -> list[float]:
        bounds = self.boundaries(depth)
        return [self.ratio ** sum(layer >= b for b in bounds) for layer in range(depth)]

    def ranking_layer(self, boundary: int) -> int:
        return boundary if self.score_layer == "next" else boundary - 1
