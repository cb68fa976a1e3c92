"""What differs between decoders, as the in-LLM loop (`tokendrop.engine.decoder`) asks it: one hook per kind.

A family grants in-LLM dropping by naming its decoder hook (`Family.decoder`, a "module:Class"
string); a family that names none has no `in_llm` capability, and a decoder its hook cannot run
(`unfit`) loses it, so `apply()` refuses FastV / PyramidDrop naming the capability and the reason
instead of failing inside a layer. The loop asks the hook five things:

    masks(...)        the attention masks of a (shortened) sequence, one per layer type
    layer_mask(i, .)  the one layer i takes
    rotary(...)       the rotary tables of the sequence's positions; layer_rotary(i, .) layer i's
    start / after     family inputs carried with the tokens (DeepStack's visual features), added
                      after a layer to the tokens still present
    cached(cache, i)  how many tokens layer i's cache holds (None: a layer without a sequence length)
    padding_mask / capture / prepare / layer_inputs
                      the 2-D padding mask when the model is handed built masks (read from the outer
                      call), per-token inputs derived from the embeddings, and the extra keywords of
                      layer i for the current slots (Gemma 4's per-layer inputs and shared_kv_states)

Kinds here: `LlamaDecoder` (Llama, Mistral, Qwen2/3; 1-D rotary or, for Qwen-VL, M-RoPE),
`DeepStackDecoder` (Qwen3-VL: visual features added after the first layers), `HybridDecoder`
(Qwen3.5: Gated-DeltaNet linear-attention layers between full-attention ones), `Gemma4Decoder`.
Decoders the Llama hook cannot run (checked by `unfit`): per-layer-type rotary tables or per-layer
inputs (Gemma 3 / 3n), layer types other than full and sliding attention (linear attention,
recurrent layers) unless a hook for them says otherwise.

B batch, L sequence, D width.
"""

from __future__ import annotations

import inspect

import torch
from transformers.masking_utils import (create_causal_mask, create_recurrent_attention_mask,
                                        create_sliding_window_causal_mask)

from tokendrop import compat

causal_mask = compat.mask_builder(create_causal_mask)
sliding_window_mask = compat.mask_builder(create_sliding_window_causal_mask)
recurrent_mask = compat.mask_builder(create_recurrent_attention_mask)

ATTENTION_LAYERS = ("full_attention", "sliding_attention")


class LlamaDecoder:
    """A Llama-style decoder: `layers` with `input_layernorm` and `self_attn.{q,k}_proj`, one `rotary_emb`,
    full (and sliding-window) attention layers, masks built from a 2-D padding mask."""

    keywords: tuple[str, ...] = ()  # forward keywords of the stock language model this hook consumes
    layer_kinds: tuple[str, ...] = ATTENTION_LAYERS  # config.layer_types this hook runs

    def __init__(self, language_model, mrope: bool = False):
        self.lm = language_model
        self.config = language_model.config
        self.mrope = mrope  # 3-D rotary positions (Qwen-VL)
        self.kinds = list(getattr(self.config, "layer_types", None) or ["full_attention"] * len(language_model.layers))
        self.length_layers = [i for i, kind in enumerate(self.kinds) if kind in ATTENTION_LAYERS]  # caches with a length

    # ---- can the loop run it ---------------------------------------------------------------------
    @classmethod
    def config_unfit(cls, text_config) -> str:
        """Why a decoder of this text config cannot run under this hook ("" when it can)."""
        other = sorted(set(getattr(text_config, "layer_types", None) or []) - set(cls.layer_kinds))
        return f"its decoder has {', '.join(other)} layers" if other else ""

    @classmethod
    def unfit(cls, language_model) -> str:
        """Why the in-LLM loop cannot run this loaded decoder under this hook ("" when it can)."""
        layers = getattr(language_model, "layers", None)
        rotary = getattr(language_model, "rotary_emb", None)
        if not layers or rotary is None or not all(
                hasattr(layer, "input_layernorm") and hasattr(getattr(layer, "self_attn", None), "q_proj") for layer in layers):
            return "its decoder is not Llama-style (layers with input_layernorm and self_attn.q_proj, one rotary_emb)"
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            return "its decoder uses a rotary table per layer type (Gemma-style)"
        if any(name.startswith("per_layer_input") for name in inspect.signature(type(layers[0]).forward).parameters):
            return "its decoder layers take per-layer inputs from the token ids (Gemma-style)"
        return cls.config_unfit(language_model.config)

    @classmethod
    def check_method(cls, text_config, method) -> None:
        """ValueError when `method`'s options do not fit a decoder of this config (here every layer
        attends and can rank: nothing more than the depth, which the method checks itself)."""

    # ---- what the loop asks ----------------------------------------------------------------------
    def masks(self, hidden, mask, positions, cache, layer_idx, origin=None) -> dict:
        """Causal masks per layer type for a sequence `hidden` (B, L, D) with padding mask `mask`
        (B, K) over every key, sized against layer `layer_idx`'s cache; `positions` the text positions
        the stock forward would pass the mask builders (or None); `origin` (B, L) the caller's index
        of each slot of a prefill (-1: padding added by a drop), None while decoding."""
        config = self.config
        args = dict(config=config, inputs_embeds=hidden, attention_mask=mask, cache=cache, position_ids=positions,
                    layer_idx=layer_idx)
        masks = {"full_attention": causal_mask(**args)}
        if getattr(config, "sliding_window", None) is not None:
            masks["sliding_attention"] = sliding_window_mask(**args)
            if "sliding_attention" not in self.kinds:
                masks["full_attention"] = masks["sliding_attention"]  # Mistral: every layer slides
        return masks

    def layer_mask(self, i: int, masks: dict):
        return masks[self.kinds[i]]

    @property
    def grows(self) -> bool:
        """Whether a one-token decode step may reuse the previous step's masks one key longer (no sliding window)."""
        return getattr(self.config, "sliding_window", None) is None

    def rotary(self, hidden, positions):
        """The rotary tables of `positions` ((B, L) or M-RoPE (3, B, L))."""
        return self.lm.rotary_emb(hidden, positions)

    def layer_rotary(self, i: int, tables):
        return tables

    @property
    def output_class(self):
        """What the stock forward returns: a mixture-of-experts decoder's output has `router_logits`
        (None here: they are not collected), which its outer model reads."""
        from transformers.modeling_outputs import BaseModelOutputWithPast, MoeModelOutputWithPast

        return MoeModelOutputWithPast if getattr(self.config, "num_experts", None) else BaseModelOutputWithPast

    def padding_mask(self, attention_mask):
        """The 2-D padding mask (B, K) (or None) the loop builds every mask from, given the language
        model's `attention_mask`; masks already built (a dict per layer type) are refused here."""
        if isinstance(attention_mask, dict):
            raise ValueError(f"tokendrop: {type(self.lm).__name__} was given its attention masks already built (a dict "
                             "per layer type); in-LLM methods build them for every shortened sequence from a 2-D padding mask")
        return attention_mask

    def capture(self, kwargs: dict) -> None:
        """Read what the hook needs from the outer model's call (`kwargs`, before it runs); nothing here."""

    def prepare(self, inputs_embeds, input_ids, extras: dict) -> None:
        """Complete `extras` with per-token inputs derived from the embeddings (B, L, D); nothing here."""

    def layer_inputs(self, i: int, origin, extras: dict) -> dict:
        """Keywords layer i takes besides the stock ones, for slots `origin` (B, L) (the caller's index of
        each slot of a prefill, -1 for padding added by a drop) or, while decoding (None), the new tokens."""
        return {}

    def take(self, kwargs: dict) -> dict:
        """The hook's own forward keywords, popped from `kwargs` (what `start` and `after` read)."""
        return {name: kwargs.pop(name, None) for name in self.keywords}

    def start(self, extras: dict):
        """(B, L) long row of each slot in the family's per-token inputs (-1: none), or None."""
        return None

    def after(self, i: int, hidden, rows, extras: dict):
        """The output of layer i with the family's inputs added to the slots `rows` still holds."""
        return hidden

    def cached(self, cache, i: int) -> int:
        """Tokens layer i's cache holds (i in `length_layers`)."""
        return cache.get_seq_length(i)

    def check_cache(self, cache) -> None:
        """Refuse caches whose layers cannot grow to different lengths (static caches preallocate)."""
        from transformers.cache_utils import DynamicLayer

        if cache is not None and not all(isinstance(layer, DynamicLayer) for layer in getattr(cache, "layers", ())):
            kinds = sorted({type(layer).__name__ for layer in cache.layers if not isinstance(layer, DynamicLayer)})
            raise ValueError(f"in-LLM methods need a cache whose layers keep their own lengths (DynamicCache); got "
                             f"{type(cache).__name__} with {', '.join(kinds)}. Do not pass cache_implementation='static' "
                             "(or a StaticCache) to generate() while PyramidDrop / FastV are applied")


class DeepStackDecoder(LlamaDecoder):
    """Qwen3-VL: the tower's DeepStack features are added to the visual tokens after the first layers
    (`visual_pos_masks` (B, L) bool, `deepstack_visual_embeds` one (Nv, D) tensor per layer); after a
    drop, to the visual tokens still present."""

    keywords = ("visual_pos_masks", "deepstack_visual_embeds")

    def start(self, extras: dict):
        if extras.get("deepstack_visual_embeds") is None:
            return None
        visual = extras["visual_pos_masks"].bool()  # (B, L); features are in its row-major order
        return (visual.flatten().long().cumsum(0) - 1).view_as(visual).masked_fill(~visual, -1)

    def after(self, i: int, hidden, rows, extras: dict):
        features = extras.get("deepstack_visual_embeds")
        if features is None or i >= len(features):
            return hidden
        where = rows >= 0
        hidden = hidden.clone()
        hidden[where] = hidden[where] + features[i].to(hidden.device, hidden.dtype)[rows[where]]
        return hidden


class HybridDecoder(LlamaDecoder):
    """Qwen3.5: Gated-DeltaNet linear-attention layers (`linear_attn`) between full-attention layers.

    Dropped tokens are sliced out before a boundary, so no later layer sees them, linear and full
    alike (masking could not stand in: a masked token still decays the recurrent state and enters
    the convolution). A linear-attention layer takes a 2-D padding mask of the current tokens (None
    when nothing is padding), its cache holds a convolution and a recurrent state with no sequence
    length: lengths are read from the full-attention layers only. A linear-attention layer has no
    attention row to rank by: a method whose ranking layer is one is refused naming the nearest
    full-attention layers (docs/design.md, "In-LLM on hybrid decoders").
    """

    layer_kinds = ("full_attention", "linear_attention")

    @classmethod
    def unfit(cls, language_model) -> str:
        kinds = getattr(language_model.config, "layer_types", None) or []
        layers = getattr(language_model, "layers", None) or []
        mixers = {"full_attention": "self_attn", "linear_attention": "linear_attn"}
        if len(kinds) != len(layers) or getattr(language_model, "rotary_emb", None) is None or not all(
                hasattr(layer, "input_layernorm") and hasattr(layer, mixers.get(kind, "?")) for layer, kind in zip(layers, kinds)):
            return "its decoder is not a hybrid of full-attention (self_attn) and linear-attention (linear_attn) layers"
        return cls.config_unfit(language_model.config)

    @classmethod
    def check_method(cls, text_config, method) -> None:
        kinds = text_config.layer_types
        full = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
        for boundary in method.boundaries(len(kinds)):
            layer = method.ranking_layer(boundary)
            if layer is None or kinds[layer] == "full_attention":
                continue
            below = max((i for i in full if i < layer), default=None)
            above = min((i for i in full if i > layer), default=None)
            nearest = " and ".join(str(i) for i in (below, above) if i is not None)
            moves = ", ".join(f"before layer {i + boundary - layer}" for i in (below, above)
                              if i is not None and 0 <= i + boundary - layer < len(kinds))
            raise ValueError(f"{type(method).__name__} ranks the tokens it drops before layer {boundary} with layer "
                             f"{layer}, a {kinds[layer]} layer of this decoder (no attention row to rank by); the "
                             f"nearest full-attention layers are {nearest}: drop {moves or 'where one of them ranks'}")

    def masks(self, hidden, mask, positions, cache, layer_idx, origin=None) -> dict:
        # the full-attention mask is sized against the stage's first full-attention layer (linear layers have no length)
        full = next((i for i in self.length_layers if i >= layer_idx), layer_idx)
        masks = super().masks(hidden, mask, positions, cache, full)
        masks["linear_attention"] = recurrent_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask,
                                                   cache=cache)
        return masks

    def check_cache(self, cache) -> None:
        from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

        layers = getattr(cache, "layers", ())
        wrong = sorted({type(layer).__name__ for layer in layers
                        if not isinstance(layer, (DynamicLayer, LinearAttentionCacheLayerMixin))})
        if cache is not None and wrong:
            raise ValueError(f"in-LLM methods need a cache whose attention layers keep their own lengths (DynamicCache); "
                             f"got {type(cache).__name__} with {', '.join(wrong)}. Do not pass "
                             "cache_implementation='static' (or a StaticCache) to generate() while PyramidDrop / FastV "
                             "are applied")


class Gemma4Decoder(LlamaDecoder):
    """Gemma 4: sliding-window and full-attention layers, a rotary table per layer type, a row of
    per-layer inputs per token and layer (PLE), keys shared between layers through `shared_kv_states`.

    `Gemma4Model` hands its language model the masks already built (a dict per layer type); the 2-D
    padding mask and `mm_token_type_ids` are read from the outer call (`capture`), and the masks of
    every shortened sequence are rebuilt from them: full layers causal, sliding layers AND(window,
    OR(causal, same image block)), the image blocks gathered with the kept slots, the window counted
    in slots (as for the stock model fed the kept prompt). Decode steps have no block overlay (the
    stock generate() drops `mm_token_type_ids` after the prefill). The per-layer inputs are projected
    once per forward, as the stock forward does, and each slot takes its own row. A KV-shared layer
    (`reuse`) reads the keys a storing layer left in `shared_kv_states`: a drop between the two is
    refused (`check_method`), as is ranking with a layer that has no keys of its own.
    (docs/design.md, "In-LLM on Gemma 4".)
    """

    keywords = ("per_layer_inputs", "logits_to_keep", "shared_kv_states")

    def __init__(self, language_model, mrope: bool = False):
        super().__init__(language_model, mrope)
        modes = compat.kv_sharing_modes(self.config)
        # a KV-shared layer writes no cache: lengths are read from the others
        self.length_layers = [i for i in self.length_layers if modes[i] != "reuse"]
        self.outer: dict = {}  # what the outer model's call passed (`capture`)
        self.blocks = None  # (B, L) long image block of each token of the current call (-1: none), or None

    @classmethod
    def unfit(cls, language_model) -> str:
        layers = getattr(language_model, "layers", None)
        if not layers or getattr(language_model, "rotary_emb", None) is None or not all(
                hasattr(layer, "input_layernorm") and hasattr(getattr(layer, "self_attn", None), "q_proj") for layer in layers):
            return "its decoder is not Gemma 4-style (layers with input_layernorm and self_attn.q_proj, one rotary_emb)"
        return cls.config_unfit(language_model.config)

    @classmethod
    def check_method(cls, text_config, method) -> None:
        modes = compat.kv_sharing_modes(text_config)
        kinds = text_config.layer_types
        store = {kinds[i]: i for i, mode in enumerate(modes) if mode == "store"}
        for boundary in method.boundaries(len(kinds)):
            layer = method.ranking_layer(boundary)
            if layer is not None and modes[layer] == "reuse":
                raise ValueError(f"{type(method).__name__} ranks with layer {layer}, a KV-shared layer of this decoder "
                                 "(it has no keys of its own to rank by): rank with a layer before "
                                 f"{modes.index('reuse')}")
            late = [j for j in range(boundary, len(kinds)) if modes[j] == "reuse" and store[kinds[j]] < boundary]
            if late:
                raise ValueError(f"{type(method).__name__} drops tokens before layer {boundary}, but KV-shared layer "
                                 f"{late[0]} reuses the keys layer {store[kinds[late[0]]]} stored for the longer "
                                 f"sequence: drop before layer {store[kinds[late[0]]] + 1} or after layer {late[-1]}")

    def capture(self, kwargs: dict) -> None:
        self.outer = {"attention_mask": kwargs.get("attention_mask"), "mm_token_type_ids": kwargs.get("mm_token_type_ids")}

    def padding_mask(self, attention_mask):
        if isinstance(attention_mask, dict):  # Gemma4Model built them: rebuild from its own 2-D mask
            attention_mask = self.outer.get("attention_mask")
        return super().padding_mask(attention_mask)

    def prepare(self, inputs_embeds, input_ids, extras: dict) -> None:
        lm = self.lm
        if lm.hidden_size_per_layer_input:
            rows = extras.get("per_layer_inputs")
            if rows is None:
                rows = lm.get_per_layer_inputs(input_ids, inputs_embeds)
            extras["per_layer_inputs"] = lm.project_per_layer_inputs(inputs_embeds, rows)
        if extras.get("shared_kv_states") is None:
            extras["shared_kv_states"] = {}
        # image blocks of this call (the outer model's, once: a later direct call has none)
        types, self.outer = self.outer.get("mm_token_type_ids"), {}
        blocks = None
        if types is not None and types.shape == inputs_embeds.shape[:2] and \
                getattr(self.config, "use_bidirectional_attention", None) == "vision":
            from transformers.models.gemma4.modeling_gemma4 import get_block_sequence_ids_for_mask

            blocks = get_block_sequence_ids_for_mask(types, device=inputs_embeds.device)
        self.blocks = blocks

    def layer_inputs(self, i: int, origin, extras: dict) -> dict:
        rows = extras.get("per_layer_inputs")
        if rows is not None:
            rows = rows[:, :, i]  # (B, L, P) in the caller's order
            if origin is not None:  # the kept slots' rows (padding added by a drop: any row, it is masked)
                rows = rows.gather(1, origin.clamp(min=0)[..., None].expand(-1, -1, rows.shape[-1]))
        return {"per_layer_input": rows, "shared_kv_states": extras["shared_kv_states"]}

    def masks(self, hidden, mask, positions, cache, layer_idx, origin=None) -> dict:
        from transformers.masking_utils import blockwise_overlay, sliding_window_overlay

        # each mask sized against the stage's first layer of its type (their caches differ in length)
        first = {kind: next((i for i in self.length_layers if i >= layer_idx and self.kinds[i] == kind), layer_idx)
                 for kind in ATTENTION_LAYERS}
        args = dict(config=self.config, inputs_embeds=hidden, attention_mask=mask, cache=cache, position_ids=positions)
        masks = {"full_attention": causal_mask(**args, layer_idx=first["full_attention"])}
        blocks = self.blocks
        if blocks is not None and origin is not None and bool((blocks >= 0).any()):
            blocks = blocks.gather(1, origin.clamp(min=0)).masked_fill(origin < 0, -1)  # the kept slots' image blocks
            masks["sliding_attention"] = causal_mask(**args, layer_idx=first["sliding_attention"],
                                                     or_mask_function=blockwise_overlay(blocks),
                                                     and_mask_function=sliding_window_overlay(self.config.sliding_window))
        else:
            masks["sliding_attention"] = sliding_window_mask(**args, layer_idx=first["sliding_attention"])
        return masks

    def rotary(self, hidden, positions):
        """One table per layer type."""
        return {kind: self.lm.rotary_emb(hidden, positions, kind) for kind in sorted(set(self.kinds))}

    def layer_rotary(self, i: int, tables):
        return tables[self.kinds[i]]
