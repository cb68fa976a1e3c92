"""Analytic costs of a LLaVA model with and without token dropping: FLOPs, KV cache, token counts.

Two families of figures (see docs/cost_model.md):

* Paper conventions, to compare with published tables. Both count a multiply-add as ONE FLOP, count
  only the LLM, ignore GQA, the causal half of attention, the LM head and decoding:
    PyramidDrop (arXiv 2410.17247): C(n) = 4nd^2 + 2n^2 d + 3ndm over image tokens only, summed
        over layers, stage sizes n * lambda^s kept real-valued  -> `pdrop_tflops`.
    FastV (arXiv 2403.06764): C(n) = 4nd^2 + 2n^2 d + 2ndm with n = system prompt (36) + image
        tokens, reported as the per-layer average -> `fastv_gflops_per_layer`.
* What a user pays, in real FLOPs (2 per multiply-add): vision tower (all encoder layers run),
  projector, scoring overhead, LLM prefill over the whole prompt (causal attention, GQA, the
  last-token LM head), decode per token, and KV-cache bytes with the tokens each layer keeps.

Hybrid decoders (Qwen3.5: `layer_types` mixes "full_attention" and "linear_attention" layers) are
counted layer by layer from `Shapes.layer_types`. A full-attention layer is counted as above, its
query projection twice as wide when it also gives an output gate (`gated_attention`). A Gated-DeltaNet
linear-attention layer (h_k query / key heads of width d_k, h_v value heads of width d_v, a K-tap
depthwise convolution over the C = 2 h_k d_k + h_v d_v channels of q, k and v) costs, per token,
    projections  d C (q, k, v) + d h_v d_v (output gate z) + 2 d h_v (decay a, step b) + h_v d_v d (out)
    convolution  C K
    recurrence   3 h_v d_k d_v: each value head's d_k x d_v state is read (k^T S), written (k delta^T)
                 and queried (q^T S); the elementwise decay is not counted, as norms and gates are not
multiply-adds, the same at prefill and at decode (no term grows with the context). Convention: the
recurrent form, the one decoding runs; the chunked prefill kernel's extra intra-chunk work is not
counted. A linear-attention layer caches no per-token keys and values: its KV bytes are 0, and its
fixed per-sequence state (h_v d_k d_v + the C x K convolution window) is reported apart
(`recurrent_state_bytes`), unchanged by dropping. The papers' conventions are kept as the papers
define them (every layer a LLaMA layer): on a hybrid decoder they only place it beside their tables.

Shapes are read from a model's modules; the shipped architectures (`archs/*.json`, no weights) are
built on the meta device, so nothing is allocated. Letters: n image tokens, L prompt length,
d / m LLM width / MLP width, T LLM depth, P partitions (tiles) of an image.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from tokendrop.families.base import LinearAttentionShapes, Shapes, TokenCount, resolve  # noqa: F401 (cost.* names)
from tokendrop.lazy import torch
from tokendrop.methods.layout import floor_mul
from tokendrop.registry import family_for, family_of

ARCHS_DIR = Path(__file__).parent / "archs"
FASTV_SYSTEM_TOKENS = 36  # system prompt length in FastV's LLaVA-1.5 scripts
DEFAULT_TEXT_TOKENS = 64  # prompt text around the image when the caller does not say


# ---- architectures -------------------------------------------------------------------------------
def arch_names() -> list[str]:
    """Names of the shipped architectures (`tokendrop/archs/NAME.json`)."""
    return sorted(p.stem for p in ARCHS_DIR.glob("*.json"))


def load_arch(name: str) -> dict:
    """The spec {"model": config dict, "processor": settings, "source": ...} of a shipped arch or a JSON path."""
    path = Path(name)
    if not (name.endswith(".json") and path.is_file()):
        known = arch_names()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown arch {name!r}.{hint} Available: {', '.join(known)} (or a path to an arch .json)")
        path = ARCHS_DIR / f"{name}.json"
    spec = json.loads(path.read_text())
    if "model" not in spec:
        raise ValueError(f"arch file {path} must hold a 'model' config")
    family_of(spec["model"].get("model_type"))  # ValueError naming the supported models
    return spec


def arch_config(spec: dict, layers: int | None = None, vision_layers: int | None = None):
    """The family's config class built from an arch spec, optionally with fewer LLM / vision layers."""
    model = json.loads(json.dumps(spec["model"]))  # deep copy
    for key, value, sub in (("layers", layers, "text_config"), ("vision_layers", vision_layers, "vision_config")):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
            depth_key = "depth" if "depth" in model[sub] else "num_hidden_layers"  # Qwen-VL towers say depth
            model[sub][depth_key] = value
            if "fullatt_block_indexes" in model[sub]:  # Qwen2.5-VL: the full-attention blocks that remain
                model[sub]["fullatt_block_indexes"] = [b for b in model[sub]["fullatt_block_indexes"] if b < value] or [value - 1]
    family = family_of(model.pop("model_type"))
    return resolve(family.config_class)(**model)


def meta_model(config):
    """The model class of `config` built on the meta device: shapes without memory."""
    family = family_of(config.model_type)
    with torch.device("meta"):
        return resolve(family.model_classes[0])(config)


def arch_processor(spec: dict, tokenizer):
    """The stock processor with the arch's image-processor settings around `tokenizer`."""
    settings = dict(spec["processor"])
    image_settings = settings.pop("image_processor")
    family = family_of(spec["model"]["model_type"])
    images = resolve(family.image_processor_class)(**image_settings)
    return family.build_processor(images, tokenizer, **settings)


# ---- paper conventions (multiply-add = 1 FLOP, LLM only) ---------------------------------------------
def pdrop_layer_macs(n: float, d: int, m: int) -> float:
    """PyramidDrop's per-layer cost C(n) = 4nd^2 + 2n^2 d + 3ndm."""
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def fastv_layer_macs(n: float, d: int, m: int) -> float:
    """FastV's per-layer cost C(n) = 4nd^2 + 2n^2 d + 2ndm."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def real_layer_tokens(inner, n: float, depth: int) -> list[float]:
    """Image tokens per layer as the papers count them: real-valued (n * lambda^s, n * (1 - R))."""
    if inner is None:
        return [float(n)] * depth
    return [n * share for share in inner.layer_fractions(depth)]


def pdrop_convention_macs(shapes: Shapes, n: float, inner=None) -> float:
    """Total LLM cost over image tokens in PyramidDrop's convention (divide by 1e12 for its "TFLOPs")."""
    return sum(pdrop_layer_macs(x, shapes.d, shapes.m) for x in real_layer_tokens(inner, n, shapes.depth))


def fastv_convention_macs(shapes: Shapes, n: float, inner=None, system: int = FASTV_SYSTEM_TOKENS) -> float:
    """Per-layer average cost in FastV's convention, n_layer = system + image tokens (1e9 -> its "FLOPs(B)")."""
    layers = real_layer_tokens(inner, n, shapes.depth)
    return sum(fastv_layer_macs(system + x, shapes.d, shapes.m) for x in layers) / shapes.depth


# ---- what a user pays (real FLOPs = 2 per multiply-add) ------------------------------------------------
def vision_flops(shapes: Shapes, tiles: int, projected: int, patches: int) -> float:
    """Vision tower over `tiles` tiles of `patches` patches (+[CLS]), then the projector over `projected` tokens."""
    t = patches + shapes.vision_tokens_extra  # + [CLS] when the tower has one
    layer = 4 * t * shapes.vd ** 2 + 2 * t * t * shapes.vd + shapes.vision_mlp_matrices * t * shapes.vd * shapes.vm
    tower = tiles * (patches * shapes.patch_inputs * shapes.vd + shapes.vision_depth * layer)
    pairs = zip(shapes.projector[::2], shapes.projector[1::2])
    return 2.0 * (tower + projected * sum(a * b for a, b in pairs))


def cls_scoring_flops(shapes: Shapes, tiles: int, patches: int, rows: int) -> float:
    """HiRED-style [CLS] rows: per tile and row, k_proj over all tokens, q_proj of [CLS], one q.K^T."""
    t = patches + shapes.vision_tokens_extra  # + [CLS] when the tower has one
    return 2.0 * tiles * rows * (t * shapes.vd ** 2 + shapes.vd ** 2 + t * shapes.vd)


def received_scoring_flops(shapes: Shapes, tiles: int, patches: int) -> float:
    """DominantDrop-style received attention: per tile, q and k projections and one full q.K^T map."""
    t = patches + shapes.vision_tokens_extra
    return 2.0 * tiles * (2 * t * shapes.vd**2 + t * t * shapes.vd)


def keys_scoring_flops(shapes: Shapes, tiles: int, patches: int) -> float:
    """VisionZip-style keys: per tile, one k_proj over all tokens (the head mean and the merge are negligible)."""
    return 2.0 * tiles * (patches + shapes.vision_tokens_extra) * shapes.vd**2


def relevance_scoring_flops(clip_config, tiles: int, patches: int, text_tokens: int) -> float:
    """CDPruner-style relevance: per tile, the CLIP head (visual_projection) over every patch; per prompt,
    the CLIP text tower over ceil(text_tokens / L) segments of its full length L (the last one padded,
    as the official runs it) and the text projection. `text_tokens` stands in for the prompt's CLIP tokens."""
    vision, text = clip_config.vision_config, clip_config.text_config
    c, h, m, length = clip_config.projection_dim, text.hidden_size, text.intermediate_size, text.max_position_embeddings
    segments = max(1, -(-text_tokens // length))
    layer = 4 * length * h**2 + 2 * length * length * h + 2 * length * h * m  # attention projections, q.K^T + A.V, MLP
    return 2.0 * (tiles * patches * vision.hidden_size * c + segments * (text.num_hidden_layers * layer + h * c))


def arch_geometry_processor(spec: dict):
    """An object holding the arch's image processor: what families with processor-dependent counts read."""
    from types import SimpleNamespace

    family = family_of(spec["model"]["model_type"])
    return SimpleNamespace(image_processor=resolve(family.image_processor_class)(**spec["processor"]["image_processor"]))


def last_token_scoring_flops(shapes: Shapes, lengths_before: list[int]) -> float:
    """In-LLM ranking at each boundary: k_proj over the sequence, q_proj of the last token, one q.K^T."""
    return 2.0 * sum(L * shapes.d * shapes.kv_width + shapes.d * shapes.q_width + L * shapes.q_width
                     for L in lengths_before)


def linear_token_macs(shapes: Shapes) -> int:
    """Multiply-adds of a Gated-DeltaNet layer's token mixer per token (module docstring): its
    projections and convolution (one multiply-add per weight) and 3 h_v d_k d_v for the state."""
    linear = shapes.linear
    return linear.params(shapes.d) + 3 * linear.value_heads * linear.key_dim * linear.value_dim


def prefill_flops(shapes: Shapes, lengths: list[int]) -> float:
    """LLM prefill, layer l over lengths[l] tokens (causal attention, or the linear-attention recurrence),
    plus the last token's logits."""
    total = 0.0
    for layer, L in enumerate(lengths):
        if shapes.is_linear(layer):
            mixer = L * linear_token_macs(shapes)
        else:  # projections (q with its gate, k, v, o), then q.K^T and A.V over the causal half (or window)
            a = shapes.attn(layer)
            mixer = L * shapes.attention_params(layer) + a.attended_pairs(L) * 2 * a.q_width
        total += mixer + 3 * L * shapes.d * shapes.m
    return 2.0 * (total + shapes.d * shapes.vocab)


def decode_flops(shapes: Shapes, lengths: list[int]) -> float:
    """One decoded token attending to lengths[l] cached tokens (+ itself) in full-attention layer l
    (a linear-attention layer: one recurrence step), plus its logits."""
    total = shapes.depth * 3 * shapes.d * shapes.m + shapes.d * shapes.vocab
    for layer, L in enumerate(lengths):
        a = shapes.attn(layer)
        total += linear_token_macs(shapes) if shapes.is_linear(layer) else (shapes.attention_params(layer)
                                                                            + 2 * a.keys(L + 1) * a.q_width)
    return 2.0 * total


def kv_bytes_per_layer(shapes: Shapes, lengths: list[int], bytes_per_element: int) -> list[int]:
    """Keys and values cached by every layer: 2 * kv_heads * head_dim * tokens * bytes (0 for a
    linear-attention layer: it keeps no per-token keys and values; a sliding-window layer keeps at most
    its window; keys that are also the values are cached twice, as transformers' cache stores both)."""
    return [0 if shapes.is_linear(layer) else 2 * shapes.attn(layer).kv_width * shapes.attn(layer).keys(L) * bytes_per_element
            for layer, L in enumerate(lengths)]


def recurrent_state_bytes(shapes: Shapes, bytes_per_element: int) -> int:
    """The fixed per-sequence state of the linear-attention layers (0 without them): each value head's
    d_k x d_v matrix and the convolution's window of K inputs (as transformers caches it), whatever the
    number of tokens."""
    if shapes.linear is None:
        return 0
    linear = shapes.linear
    per_layer = linear.value_heads * linear.key_dim * linear.value_dim + linear.conv_width * linear.conv_kernel
    return sum(shapes.is_linear(layer) for layer in range(shapes.depth)) * per_layer * bytes_per_element


# ---- one record per method ----------------------------------------------------------------------------
def split_methods(methods) -> tuple:
    """(pre-LLM method or None, in-LLM method or None)."""
    pre = next((m for m in methods if m.stage == "pre"), None)
    inner = next((m for m in methods if m.stage == "in"), None)
    return pre, inner


def check_methods(model, methods) -> None:
    """What `apply()` refuses, refused here too: a capability the family lacks (HiRED's [CLS] on
    Qwen-VL), a layer beyond the LLM's or the tower's depth. The family adapter's own check, the one
    `tokendrop.api.check` runs; ValueError / TypeError naming the problem."""
    family = family_for(model)
    for method in methods:
        family.check(method)


def geometry_of(model, processor=None):
    """The geometry that lays out an image for `model` (with `processor`'s resize settings when given)."""
    family = family_for(model)
    return family.geometry if processor is None else family.processor_geometry(processor)


def kept_tokens(pre, geometry, image_size, tokens: int | None = None) -> int:
    """Visual tokens the pre-LLM method `pre` gives an image of (height, width) pixels: the patched
    processor's count, or floor(budget * tokens) with a `tokens` override. ValueError when none is
    kept (the processor refuses such an image), or for a size the family cannot lay out."""
    if tokens is None:
        return TokenCount(geometry, pre)(image_size)
    n = floor_mul(pre.budget, tokens)
    if n == 0:
        raise ValueError(f"{pre!r} keeps no visual token of tokens={tokens}: the image would be invisible to "
                         f"the model. The smallest budget that keeps one token is {1 / tokens:.4g}")
    return n


def method_cost(model, methods, image_size, text_tokens: int = DEFAULT_TEXT_TOKENS, batch: int = 1,
                bytes_per_element: int = 2, tokens: int | None = None, processor=None) -> dict:
    """Every analytic figure for `methods` (a tuple from `tokendrop.registry.build_methods`) on one image size.

    Args:
        model: a LLaVA / LLaVA-NeXT model (meta device is fine).
        image_size: (height, width) in pixels.
        text_tokens: prompt tokens that are not image tokens.
        batch: prompts per forward; prefill / decode FLOPs and KV bytes scale with it.
        bytes_per_element: 2 for fp16 / bf16 caches, 4 for fp32.
        tokens: override the stock visual-token count (papers use 2880 = 5 x 576 for LLaVA-NeXT);
            a pre-LLM method then keeps floor(budget * tokens).
        processor: the model's processor (or an object with its `image_processor`), for families
            whose token count depends on its resize settings (Qwen-VL); None: the family defaults.
    Raises:
        ValueError / TypeError for what `apply()` and the patched processor refuse (`check_methods`,
            `kept_tokens`): the figures of a run that cannot happen are not computed.
    """
    family = family_for(model)
    check_methods(model, methods)
    shapes = family.shapes()
    geometry = geometry_of(model, processor)
    layout = geometry.layout(image_size)
    pre, inner = split_methods(methods)
    stock = family.stock_tokens(image_size, processor) if tokens is None else tokens
    n = stock if pre is None else kept_tokens(pre, geometry, image_size, tokens)
    image_layers = inner.layer_counts(n, shapes.depth) if inner is not None else [n] * shapes.depth
    lengths = [text_tokens + x for x in image_layers]
    boundaries = inner.boundaries(shapes.depth) if inner is not None else ()
    scoring = last_token_scoring_flops(shapes, [lengths[b - 1] for b in boundaries if b > 0])
    tiles, patches = family.vision_work(layout)  # what the tower runs on
    kinds = []
    if pre is not None:
        cls_token = "cls_token" in family.capabilities()
        kinds = [score.resolve(cls_token) for score in pre.scores().values()]  # VisionZip: "received" without [CLS]
        scoring += cls_scoring_flops(shapes, tiles, patches, kinds.count("cls"))
        scoring += kinds.count("received") * received_scoring_flops(shapes, tiles, patches)
        scoring += kinds.count("keys") * keys_scoring_flops(shapes, tiles, patches)
        if "relevance" in kinds:  # CDPruner: its CLIP's image head and text tower
            scoring += relevance_scoring_flops(pre.clip_config(), tiles, patches, text_tokens)
    # the projector runs over every token when nothing is dropped before it, when the family projects all, and
    # for methods that score the projected features (DivPrune, CDPruner); else over the kept ones only
    everything = pre is None or family.projects_all or "projected" in kinds
    projected = layout.num_partitions * layout.patches if everything else n
    vision = vision_flops(shapes, tiles, projected, patches)
    kv = kv_bytes_per_layer(shapes, lengths, bytes_per_element)
    llm = prefill_flops(shapes, lengths)
    return {
        "method": "+".join(type(m).__name__ for m in methods) or "none",
        "image_size": [int(image_size[0]), int(image_size[1])],
        "tiles": list(layout.tiles),
        "partitions": layout.num_partitions,
        "batch": batch,
        "stock_visual_tokens": stock,
        "visual_tokens": n,
        "text_tokens": text_tokens,
        "layer_image_tokens": image_layers,
        "equivalent_tokens": sum(image_layers) / len(image_layers),
        "pdrop_tflops": pdrop_convention_macs(shapes, n, inner) / 1e12,
        "pdrop_tflops_vanilla": pdrop_convention_macs(shapes, stock) / 1e12,
        "fastv_gflops_per_layer": fastv_convention_macs(shapes, n, inner) / 1e9,
        "fastv_gflops_per_layer_vanilla": fastv_convention_macs(shapes, stock) / 1e9,
        "vision_flops": batch * vision,
        "scoring_flops": batch * scoring,
        "llm_prefill_flops": batch * llm,
        "prefill_flops": batch * (vision + scoring + llm),
        "decode_flops_per_token": batch * decode_flops(shapes, lengths),
        "kv_cache_bytes": batch * sum(kv),
        "kv_cache_bytes_per_layer": [batch * x for x in kv],
        "recurrent_state_bytes": batch * recurrent_state_bytes(shapes, bytes_per_element),
        "kv_bytes_per_element": bytes_per_element,
        "lm_params": shapes.lm_params(),
    }
