"""The two method contracts, and the validation every method config shares.

A method is a frozen dataclass whose fields are its options (`tokendrop methods` lists them, and
every subcommand takes them as `--method-args key=value,...`), validated in `__post_init__` with
errors that name the field, the value and what is allowed. It holds the method's arithmetic only:
which tokens, never how a model is run (that is the model family's adapter).

Pre-LLM methods (`PreLLMMethod`) choose among an image's vision tokens before the LLM sees them:
    how many   `num_tokens(layout)`: known from the image size alone, BEFORE encoding; the
               processor writes exactly that many placeholders.
    which      `select(layout, scores)`: sorted kept indices per partition, exactly `num_tokens`
               in all (without newlines), ties broken by the lower index.
    reads      `scores()`: name -> `Score(kind, layer)`, per-token inputs the adapter computes from
               the vision tower: scores, (P, N) fp32, from the tower's own projections ("cls": the
               [CLS] row summed over heads; "received": the attention each token receives), or
               features, (P, N, width) fp32 ("features": the feature block's output before the
               projector; "projected": the LLM-space rows after it; "keys": the feature block's
               keys), or "relevance" (P, N) to the sample's instruction, from the method's
               `relevance()` of the sample's prompt text. `Score` lists what a family computes for
               each kind; `select` gets them by name.
    merges     `merge(layout, scores, cls)` (methods with `merges = True`, families with capability
               "merge"): per partition a `Merged` (kept patches, merged pre-projector rows, whether
               the partition's [CLS] state is fed); the family projects all of them with the stock
               projector. The count is still `num_tokens(layout)`, known before encoding.
In-LLM methods (`InLLMMethod`) drop image tokens between the language model's layers:
    where      `boundaries(depth)`: layers before which image tokens are dropped.
    how many   `keep_counts(n, depth)`: (boundary, image tokens kept from it on), from the
               sample's ORIGINAL count n.
    ranked by  `ranking_layer(boundary)`: whose projections give the last prompt token's attention
               row: boundary - 1 (the last layer before the drop) or boundary (the first after);
               None when there is no attention to rank by, and `random_scores` ranks instead.
    positions  `positions`: "renumber" (contiguous after each drop) or "original" (kept as they were).
The keep set is chosen at prefill and fixed while decoding; the decoder loop
(`tokendrop.engine.decoder`) runs the layers and asks the method these questions, nothing else.

To add a method:
  1. Write `methods/<name>.py`: a frozen dataclass subclassing `PreLLMMethod` or `InLLMMethod`,
     `name = "<the CLI name>"`, a docstring that cites the paper, options as fields with defaults
     and validation in `__post_init__`, the contract's functions with numbered steps as in the paper.
  2. List the class in `tokendrop.registry.METHODS` (a third-party package: the `tokendrop.methods`
     entry-point group, or `td.register_method` in a script).
The contract tests iterate the registry, `tokendrop methods` lists the method, and every CLI
subcommand accepts it. A runnable walk-through: docs/extending.md.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import ClassVar

from tokendrop.lazy import torch
from tokendrop.methods.layout import Layout, budget_tokens


def check_number(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float; TypeError / ValueError naming `name` unless it is a real number in the interval.

    NumPy scalars are numbers too; a float32 is read as the decimal it prints as (np.float32(0.2) -> 0.2).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value) if isinstance(value, (int, float)) else float(str(value))
    ok = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not (ok and math.isfinite(value)):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_int(name: str, value, low: int, high: int | None = None, allowed: str | None = None) -> int:
    """`value` as an int; TypeError / ValueError naming `name` unless it is an integer in [low, high].

    `allowed` replaces the interval in the message (e.g. "an int in [0, depth)").
    """
    allowed = allowed or f"an int in [{low}, {'inf' if high is None else high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def check_budget(budget) -> float:
    """A pre-LLM budget: a fraction in (0, 1] of the patch tokens."""
    return check_number("budget", budget, 0.0, 1.0, low_open=True)


SEED_MAX = 2**63 - 1  # torch generators take a signed 64-bit seed


def set_field(config, name: str, value) -> None:
    """Store a validated (normalised) value on a frozen dataclass in `__post_init__`."""
    object.__setattr__(config, name, value)


class Method:
    """What every method has: a registry name and its options (the dataclass fields)."""

    name: ClassVar[str] = ""  # the name users type: `--method hired`
    stage: ClassVar[str] = ""  # "pre" (before the LLM) or "in" (inside it)

    @classmethod
    def options(cls) -> dict:
        """Option name -> dataclasses.Field, in declaration order."""
        return {f.name: f for f in fields(cls)}

    def requires(self) -> set[str]:
        """Capabilities a model family must have (`tokendrop.families.base.Family`)."""
        raise NotImplementedError

    @classmethod
    def tiny_options(cls) -> dict:
        """Options that let the method run on the tiny random models without any download (the contract
        tests build every method with them): {} for most; CDPruner's is a tiny random CLIP."""
        return {}


#: input kinds that are per-token feature vectors, (P, N, width), rather than (P, N) scores
FEATURE_KINDS = ("features", "projected", "keys")


@dataclass(frozen=True)
class Score:
    """A per-token input a pre-LLM method reads, computed by the adapter from the vision tower.

    Every kind is one fp32 tensor per image with one row per partition (P) and one entry per patch
    token (N, raster order of the partition's grid; on Qwen-VL one token per merged 2x2 group):
        "cls"        (P, N) the [CLS] query's softmax row over the patches, summed over heads
                     (towers with a [CLS] token: capability "cls_token").
        "received"   (P, N) the attention each token receives, averaged over heads and over the
                     queries of its partition (Qwen-VL: summed over the 2x2 group's patches).
        "features"   (P, N, Dv) the feature block's output (the hidden states the stock model
                     projects: `vision_feature_layer`, [CLS] dropped), before the projector.
                     Qwen-VL: (1, N, 4 * Dv) the merger's input, each 2x2 group's four patch
                     states concatenated in the merger's order (before its norm).
        "projected"  (P, N, D) the projector's output for every token: the rows the stock model
                     hands the LLM. LLaVA-NeXT / OneVision: the projector (a per-token MLP) run on
                     every tile, padding tokens included (they are never candidates: `Layout.valid`).
                     Qwen-VL: the merger's output, raster order.
        "relevance"  (P, N) each token's relevance to its sample's instruction: the method's own
                     `relevance(features, instructions)` of the feature block's states ("features")
                     and the sample's prompt text, which the engine captures per sample when the
                     image is encoded (capability "instruction"; instruction-conditioned methods).
        "keys"       (P, N, hd) the feature block's key projections averaged over heads ([CLS]
                     dropped), recomputed from the block's input in the same tower pass (VisionZip's
                     metric). Qwen-VL: (1, N, 4 * hd) each 2x2 group's four patch keys (averaged
                     over heads, before the rotary embedding) concatenated in the merger's order.
    The feature kinds need the family capability "features". A family provides them by computing
    them in its `get_image_features` seam (transformers) and its vLLM model class, from the same
    tower pass that the stock model runs, and by answering them in `config_score_blocks`
    ((kind, the feature block)); a family that cannot leaves the capability off, and methods that
    read them are refused by name.

    Attributes:
        kind: one of the kinds above.
        layer: encoder block index (negative counts from the end); None: the block whose output
            the LLM receives (`vision_feature_layer`). Feature kinds are always that block's (None).
        clamp: a block past the tower's last one reads the last one instead of being refused (a
            method whose official default layer is absolute and deeper than small towers: HiPrune).
        fallback: the kind read instead on towers without a [CLS] token, for a "cls" input
            (VisionZip: "received"); None: such towers are refused (capability "cls_token").
    """

    kind: str
    layer: int | None = None
    clamp: bool = False
    fallback: str | None = None

    def resolve(self, cls_token: bool) -> str:
        """The kind a tower with (or without) a [CLS] token computes for this input."""
        return self.fallback if (self.kind == "cls" and not cls_token and self.fallback) else self.kind

    def __post_init__(self):
        if self.kind in (*FEATURE_KINDS, "relevance") and self.layer is not None:
            raise ValueError(f"a {self.kind!r} input comes from the feature block only: its layer must be None, "
                             f"got {self.layer!r}")


@dataclass(frozen=True)
class PreLLMMethod(Method):
    """Keep a fixed budget of every image's vision tokens, chosen before the LLM.

    Attributes:
        budget: fraction in (0, 1] of the P*N patch tokens to keep.
        keep_newlines: also pack one newline token per unpadded canvas row (LLaVA-NeXT); with
            budget 1.0 this reproduces the stock token sequence exactly.
    """

    budget: float
    keep_newlines: bool = False

    stage: ClassVar[str] = "pre"

    def __post_init__(self):
        set_field(self, "budget", check_budget(self.budget))
        if not isinstance(self.keep_newlines, bool):
            raise TypeError(f"keep_newlines must be a bool, got {type(self.keep_newlines).__name__}")

    #: the method feeds merged tokens (`merge`); families need capability "merge"
    merges: ClassVar[bool] = False

    def requires(self) -> set[str]:
        kinds = {score.kind for score in self.scores().values()}
        needs_cls = any(score.kind == "cls" and not score.fallback for score in self.scores().values())
        return {"pre_llm"} | ({"cls_token"} if needs_cls else set()) | (
            {"features"} if kinds & {*FEATURE_KINDS, "relevance"} else set()) | (
            {"merge"} if self.merges else set()) | ({"instruction"} if "relevance" in kinds else set())

    def scores(self) -> dict[str, Score]:
        """The scores `select` reads, by name (none for score-free methods)."""
        return {}

    def counts(self, layout: Layout, scores: dict | None = None) -> list[int]:
        """Kept tokens per partition; they sum to `budget_tokens(self.budget, layout)`."""
        raise NotImplementedError

    def relevance(self, features: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        """(T, N) fp32 "relevance" scores of T partitions' feature-block states (T, N, Dv), each
        partition's sample prompt text in `instructions` (methods with a "relevance" score)."""
        raise NotImplementedError(f"{type(self).__name__} reads no 'relevance' score")

    def select(self, layout: Layout, scores: dict) -> list[torch.Tensor]:
        """Sorted kept indices (into N) for every partition, `counts` of them.

        Args:
            scores: name -> fp32 tensor, one row per partition, for every name in `scores()`:
                (P, N) for scores, (P, N, width) for the feature kinds (`Score`).
        """
        raise NotImplementedError

    def merge(self, layout: Layout, scores: dict, cls: bool) -> list[Merged]:
        """The tokens of every partition when the method merges (`merges`): see `Merged`.

        Args:
            scores: as in `select`.
            cls: the tower puts a [CLS] token in front of the patches (its state can be fed).
        The fed tokens (a [CLS] state where `Merged.cls`, the kept patches, the merged rows) sum to
        `num_tokens(layout)` without newlines.
        """
        raise NotImplementedError(f"{type(self).__name__} does not merge tokens")

    def num_tokens(self, layout: Layout) -> int:
        """Visual tokens this method hands to the LLM for one image: known before encoding."""
        newlines = layout.canvas_rows if (self.keep_newlines and layout.num_tiles and layout.newlines) else 0
        return budget_tokens(self.budget, layout) + newlines


@dataclass(frozen=True)
class Merged:
    """One partition's tokens under a merging method, fed in this order: the partition's [CLS]
    state (when `cls`), the kept patches (`keep`, raster order), the merged rows (`rows`).

    Attributes:
        cls: feed the partition's [CLS] state (the feature block's, projected by the stock projector).
        keep: (K,) sorted kept patch indices into N.
        rows: (M, width) fp32 merged rows in the space of the method's "features" input (before the
            projector); the family projects them with the stock projector.
        anchors: (M,) long, the patch (index into N) each merged row stands for: its position on
            M-RoPE models and where `show` draws it (1-D models give it the next slot in the sequence).
    """

    cls: bool
    keep: torch.Tensor
    rows: torch.Tensor
    anchors: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.cls) + self.keep.numel() + self.anchors.numel()


POSITION_RULES = ("renumber", "original")


class InLLMMethod(Method):
    """Drop image tokens between the language model's layers (subclasses are frozen dataclasses
    with a `positions` field)."""

    stage: ClassVar[str] = "in"
    positions: str

    def requires(self) -> set[str]:
        return {"in_llm"} | ({"renumber"} if self.positions == "renumber" else set())

    def boundaries(self, depth: int) -> tuple[int, ...]:
        """Layers before which image tokens are dropped, validated against an LLM of `depth` layers."""
        raise NotImplementedError

    def keep_counts(self, n: int, depth: int) -> list[tuple[int, int]]:
        """(boundary, image tokens kept from that layer on) for a sample with n image tokens."""
        raise NotImplementedError

    def ranking_layer(self, boundary: int) -> int | None:
        """The layer whose projections rank the image tokens before `boundary` (boundary - 1 or
        boundary); None: rank with `random_scores`."""
        raise NotImplementedError

    def random_scores(self, image: torch.Tensor) -> torch.Tensor:
        """(B, L) scores of the image tokens (B, L bool) when `ranking_layer` is None."""
        raise NotImplementedError(f"{type(self).__name__} always ranks by attention")

    def rank(self, boundary: int, view) -> torch.Tensor:
        """(B, L) scores of the current sequence's tokens before `boundary`: the engine keeps each
        sample's top `keep_counts` image tokens by them (ties to the lower index), never a query
        token, and applies the position rule; only image slots are read.

        Override to rank by something else than one attention row (all tokens' attention, key
        norms, similarity to pivots, a text-guided rater). `view` (`tokendrop.engine.decoder.RankingView`)
        holds the current sequence: `image`, `query`, `mask` (B, L) bool; `inputs(layer)` (B, L, D),
        the hidden states entering layer `boundary - 1` or `boundary`; `attention_row(layer)` (B, L),
        the query tokens' attention there (recomputed from the layer's projections, never an N x N
        map); `rotary(layer)`, its position embeddings; `layers`, the decoder layers; `norm`, the final norm.
        Default: `view.attention_row(self.ranking_layer(boundary))`, or `random_scores` when the
        ranking layer is None.
        """
        layer = self.ranking_layer(boundary)
        if layer is None:
            return self.random_scores(view.image)
        return view.attention_row(layer)

    def layer_fractions(self, depth: int) -> list[float]:
        """Share of the original image tokens each layer sees, unrounded (the papers' FLOP convention)."""
        raise NotImplementedError

    def layer_counts(self, n: int, depth: int) -> list[int]:
        """Image tokens each of the `depth` layers sees, for a sample with n image tokens."""
        counts, current, drops = [], n, dict(self.keep_counts(n, depth))
        for layer in range(depth):
            current = drops.get(layer, current)
            counts.append(current)
        return counts


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
