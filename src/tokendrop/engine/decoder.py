"""In-LLM dropping: a replacement forward for a stock decoder, run through its family's decoder hook
(`tokendrop.engine.decoders`: Llama, Mistral, Qwen2/3, the Qwen-VL text models with M-RoPE and DeepStack).

The stock `LlamaModel.forward` builds the mask and position embeddings once and runs every layer
on the same sequence, so a hook on one layer cannot shorten it. This forward is the stock loop plus
one thing: before a boundary layer it ranks the image tokens by the last prompt token's attention
(`tokendrop.scoring`, from a layer's own projections), gathers the kept tokens, their positions and
mask, and continues with a shorter sequence. Every layer keeps its own attention backend (SDPA,
flash, eager) and writes what it saw into its own cache slot: DynamicCache keeps a length per layer.
What differs between decoders (mask types per layer, rotary tables, inputs added after a layer such
as DeepStack's, layers whose cache has no length, masks handed over already built, extra keywords of
each layer such as Gemma 4's per-layer inputs) is asked of the family's hook, never tested here.

Prefill (the layer-0 cache is empty) selects; decoding reuses the prefill's static keep sets:
  stage mask  = the stage's compacted prefill mask + the caller's mask for the decoded tokens,
  positions   = the caller's positions, minus the tokens dropped before the stage ("renumber").
A chunk of several new tokens on a filled cache (the next turn of a conversation, passed with the
cache of an earlier generate()) is decoded the same way, all its tokens at once: nothing in it is
dropped, and each attends to what every layer kept plus the chunk causally. A chunk holding image
tokens is refused (they would reach the LLM unselected).
A sample's image tokens are found from its own input_ids; samples differ in length after a drop
when they keep different numbers of tokens, and are then left-padded again (mask 0).
M-RoPE (Qwen-VL): the 3-D rotary positions are gathered with the tokens, so kept tokens keep their
original phases (renumbering is refused for these models); the text row, when the caller gives
one, goes to the masks and layers as the stock forward passes it. Inputs a hook adds after a layer
(Qwen3-VL's DeepStack features) are added to the kept tokens only: each slot carries its row.

B batch, L sequence, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokendrop import compat
from tokendrop.scoring import query_attention_row


class Stage:
    """What a drop at one boundary left behind, reused at every decode step."""

    def __init__(self, layer: int, mask: torch.Tensor, shift: torch.Tensor, same: bool):
        self.layer = layer  # first layer that sees the compacted sequence
        self.mask = mask  # (B, L') bool, the compacted prefill mask
        self.shift = shift  # (B,) long, positions to subtract while decoding
        self.same = same  # nothing was dropped: the previous stage's mask and positions hold


@dataclass
class Tokens:
    """The current sequence of a prefill and what each slot is. All (B, L[, D]) unless noted."""

    hidden: torch.Tensor
    mask: torch.Tensor  # bool: a real token (not padding)
    positions: torch.Tensor  # long: position ids (the text row for M-RoPE models)
    image: torch.Tensor  # bool: an image (or video) token
    query: torch.Tensor  # bool: a scoring query (last prompt token, or the token before each answer)
    origin: torch.Tensor  # long: index in the caller's sequence, -1 for padding added by a drop
    rope: torch.Tensor | None = None  # (3, B, L) long: M-RoPE positions, or None (1-D rotary)
    visual: torch.Tensor | None = None  # long: row in the hook's per-token inputs (DeepStack), -1 for other slots

    def gather(self, index: torch.Tensor, valid: torch.Tensor) -> "Tokens":
        """The slots `index` (B, L'); slots where `valid` is False become padding."""
        pick = lambda t: t.gather(1, index) & valid  # noqa: E731
        hidden = self.hidden.gather(1, index[..., None].expand(-1, -1, self.hidden.shape[-1]))
        rope = None if self.rope is None else self.rope.gather(2, index[None].expand(3, -1, -1))
        visual = None if self.visual is None else self.visual.gather(1, index).masked_fill(~valid, -1)
        return Tokens(hidden, pick(self.mask), self.positions.gather(1, index), pick(self.image), pick(self.query),
                      self.origin.gather(1, index).masked_fill(~valid, -1), rope, visual)

    @property
    def rotary(self) -> torch.Tensor:
        """What the rotary embedding takes: the M-RoPE positions, else the position ids."""
        return self.positions if self.rope is None else self.rope


class RankingView:
    """What an in-LLM method's `rank` reads before boundary `boundary` (`InLLMMethod.rank`): the
    current sequence and the two layers around the drop, read on demand. All (B, L[, D])."""

    def __init__(self, decoder, seq: Tokens, boundary: int, layer_input: torch.Tensor | None):
        self.decoder, self.seq, self.boundary, self._before = decoder, seq, boundary, layer_input
        self.image, self.query, self.mask = seq.image, seq.query, seq.mask
        self.layers, self.norm = decoder.lm.layers, decoder.lm.norm

    def inputs(self, layer: int) -> torch.Tensor:
        """(B, L, D) hidden states entering `layer` (the layer before the boundary, or the boundary)."""
        if layer == self.boundary and self.seq.hidden is not None:
            return self.seq.hidden
        if layer == self.boundary - 1 >= 0 and self._before is not None:
            return self._before
        raise ValueError(f"before boundary {self.boundary} a method ranks with layer {self.boundary - 1} or "
                         f"{self.boundary}, got {layer}")

    def rotary(self, layer: int):
        """The position embeddings (cos, sin) `layer` applies to this sequence."""
        decoder = self.decoder
        return decoder.layer_rotary(layer, decoder.rotary(self.inputs(layer), self.seq.rotary))

    def attention_row(self, layer: int) -> torch.Tensor:
        """(B, L) attention of each sample's query token(s) over the sequence in `layer`."""
        x = self.inputs(layer)
        return query_attention_row(self.layers[layer], x, self.rotary(layer), self.query, key_mask=self.mask)


def split_positions(position_ids, past: int, B: int, L: int, device, mrope: bool):
    """(text positions (B, L) or None, M-RoPE positions (3, B, L) or None) from what the caller passed.

    M-RoPE callers pass (4, B, L) = text row + t/h/w rows (generate), (3, B, L), (1, B, L) (generate
    continuing a cache it was given: text positions + rope_deltas), (B, L) or nothing;
    1-D callers (B, L), (1, L) or nothing. Missing text positions of a 1-D model are counted from
    `past`, as the stock forward does.
    """
    if not mrope:
        if position_ids is None:
            position_ids = torch.arange(past, past + L, device=device)[None]
        return position_ids.expand(B, -1), None
    if position_ids is None:
        rope = torch.arange(past, past + L, device=device).view(1, 1, -1).expand(3, B, -1)
        return None, rope
    if position_ids.ndim == 2:
        return None, position_ids[None].expand(3, B, -1)
    if position_ids.shape[0] == 4:
        return position_ids[0].expand(B, -1), position_ids[1:].expand(-1, B, -1)
    return None, position_ids.expand(3, B, -1)  # (3, B, L), or (1, B, L): one row for t/h/w (continuing a cache)


def same_sequence(before: "Tokens", after: "Tokens") -> bool:
    """Whether a drop kept every slot in place (same mask and positions): masks and rotary tables hold."""
    return before.mask.shape == after.mask.shape and torch.equal(before.mask, after.mask) and torch.equal(
        before.positions, after.positions)


def keep_index(scores: torch.Tensor, image: torch.Tensor, keep: torch.Tensor, query: torch.Tensor):
    """Slots of the sequence after keeping each sample's top-`keep` image tokens and everything else.

    A scoring query is never dropped: when it is itself an image token (a prompt that ends with
    its image, or an answer that starts right after it) it is kept, counts as one of the `keep`,
    and the other image tokens are ranked for the rest (docs/design.md).

    Args:
        scores: (B, L) ranking of the tokens (only image tokens are ranked).
        image: (B, L) bool.
        keep: (B,) long, image tokens to keep per sample.
        query: (B, L) bool, the scoring queries.
    Returns:
        index: (B, L') long into L, kept tokens in order, left-padded to the longest sample.
        valid: (B, L') bool, False on the padding slots.
    """
    B, L = image.shape
    ranked = image & ~query
    scores = scores.masked_fill(~ranked, float("-inf"))
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # ties: lower index first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=image.device).expand(B, L))
    rest = keep - (image & query).sum(dim=1)  # (B,) image tokens left after the query ones
    kept = ~ranked | (rank < rest[:, None])  # (B, L) text, padding, queries and the top image tokens
    lengths = kept.sum(dim=1)
    width = int(lengths.max())
    slot = torch.arange(width, device=image.device)[None] - (width - lengths)[:, None]  # (B, L')
    source = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)  # kept indices first, in order
    return source.gather(1, slot.clamp(min=0)), slot >= 0


def query_tokens(mask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """(B, L) bool scoring queries: the token before each answer span when `labels` mark answers
    (training), else the last non-padding token (the last prompt token at inference)."""
    last = torch.zeros_like(mask)
    last[torch.arange(mask.shape[0]), mask.shape[1] - 1 - torch.argmax(mask.flip(1).int(), dim=1)] = True
    if labels is None or labels.shape != mask.shape:
        return last
    answer = labels != -100
    before = torch.zeros_like(mask)
    before[:, :-1] = ~answer[:, :-1] & answer[:, 1:] & mask[:, :-1]
    return torch.where(before.any(dim=1, keepdim=True), before, last)


def extend_mask(mask):
    """A single-query mask one key longer, the new key attended like the previous one (the last token
    is always attended); NotImplemented for a mask type that cannot grow (flex attention's BlockMask)."""
    if mask is None:  # no padding anywhere: the backend runs without a mask, and still does
        return None
    if isinstance(mask, torch.Tensor):  # (B, 1, 1, K) bool / additive float, or (B, K) for flash
        return torch.cat([mask, mask[..., -1:]], dim=-1)
    return NotImplemented


class LLMDropper:
    """Replaces `language_model.forward` (instance attribute) for one in-LLM method, running the
    layers through `decoder`, the family's hook (`tokendrop.engine.decoders`)."""

    def __init__(self, decoder, method, record):
        self.decoder = decoder
        self.lm = language_model = decoder.lm
        self.method = method
        self.mrope = decoder.mrope  # 3-D rotary positions (Qwen-VL)
        self.renumber = method.positions == "renumber" or (method.positions is None and not self.mrope)
        self.record = record  # callable(layer_tokens (B, depth) long, origin (B, L') long)
        self.depth = len(language_model.layers)
        self.boundaries = method.boundaries(self.depth)
        self.image_mask = None  # (B, L) bool, set by the outer model's pre-hook each prefill
        self.labels = None  # (B, L) long, set while a forward with labels runs (training)
        self.origin = None  # (B, L') long, caller's index of every output slot of the last prefill
        self.stages: list[Stage] = []
        self.prefill_length = 0
        self.decode_masks: dict = {}  # stage layer -> (masks of the last one-token decode step, their key length)
        # the installed release's name for the cache keyword of a decoder layer (renamed in 5.24)
        self.cache_kw = compat.cache_keyword(type(language_model.layers[0]).forward)

    # ---- entry --------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, **kwargs):
        """The stock language model's forward, under either name of the cache (`compat`).

        With `output_hidden_states`, entry i < depth of the returned `hidden_states` is the input of
        layer i with the tokens that layer saw (after any drop before it), the last entry the normed
        output, like the stock tuple of depth + 1 tensors; their lengths differ across a drop.
        Keywords of the family's own (the hook's `keywords`, e.g. Qwen3-VL's DeepStack inputs) are
        taken by the hook.
        """
        lm = self.lm
        cache = compat.cache_argument(cache, past_key_values)
        extras = self.decoder.take(kwargs)
        attention_mask = self.decoder.padding_mask(attention_mask)  # a dict of built masks: the hook's to answer
        if kwargs.pop("output_attentions", None) or lm.config.output_attentions:
            raise ValueError("output_attentions=True is not available under in-LLM methods (the layers run SDPA / flash "
                             "attention on shortened sequences); remove the handle to read attention maps")
        if kwargs.pop("output_router_logits", None):
            raise ValueError("output_router_logits=True is not available under in-LLM methods (the experts' router logits "
                             "are not collected on shortened sequences); remove the handle to train with the router loss")
        keep_states = kwargs.pop("output_hidden_states", None)
        states = [] if (lm.config.output_hidden_states if keep_states is None else keep_states) else None
        self.decoder.check_cache(cache)
        if inputs_embeds is None:
            inputs_embeds = lm.embed_tokens(input_ids)
        self.decoder.prepare(inputs_embeds, input_ids, extras)  # per-token inputs derived from the embeddings
        use_cache = lm.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=lm.config)
        past = self._cached_tokens(cache)
        B, L, _ = inputs_embeds.shape
        text, rope = split_positions(position_ids, past, B, L, inputs_embeds.device, self.mrope)
        if attention_mask is None:
            attention_mask = torch.ones(B, past + L, dtype=torch.bool, device=inputs_embeds.device)
        attention_mask = attention_mask.bool()
        self.pass_text = text is not None  # hand text positions to masks and layers as the stock forward does
        positions = text if text is not None else (attention_mask[:, past:].long().cumsum(dim=1) - 1 + past)
        if past == 0:
            hidden = self.prefill(inputs_embeds, attention_mask, positions, rope, extras, cache, use_cache, states, **kwargs)
        else:
            hidden = self.decode(inputs_embeds, attention_mask, positions, rope, extras, cache, use_cache, states, **kwargs)
        hidden = lm.norm(hidden)
        return compat.model_output(self.decoder.output_class, cache, last_hidden_state=hidden,
                                   hidden_states=None if states is None else (*states, hidden))

    def _cached_tokens(self, cache) -> int:
        """How many of the caller's tokens the cache holds (0: a prefill), from the first layer whose
        cache counts tokens; a drop before it (FastV k=0) left fewer entries there than the prefill had."""
        if cache is None:
            return 0
        first = self.decoder.length_layers[0]  # the first layer whose cache counts tokens
        past = self.decoder.cached(cache, first)
        return past + self.prefill_length - self._width(first) if past else 0

    def _width(self, i: int) -> int:
        """Tokens of the last prefill that layer i kept."""
        return next((s.mask.shape[1] for s in reversed(self.stages) if s.layer <= i), self.prefill_length)

    # ---- prefill: select and compact -------------------------------------------------------------
    def prefill(self, hidden, mask, positions, rope, extras, cache, use_cache, states, **kwargs):
        image = self.image_mask
        if image is None or image.shape != mask.shape:
            image = torch.zeros_like(mask)
        seq = Tokens(hidden, mask, positions, image.to(mask.device) & mask, query_tokens(mask, self.labels),
                     torch.arange(mask.shape[1], device=mask.device).expand_as(mask), rope, self.decoder.start(extras))
        original = seq.image.sum(dim=1)  # (B,) N per sample
        drops = dict(self._keep_counts(original))
        self.stages, self.prefill_length, self.decode_masks = [], mask.shape[1], {}
        counts = torch.zeros(hidden.shape[0], self.depth, dtype=torch.long, device=hidden.device)
        layer_input = hidden
        for i, layer in enumerate(self.lm.layers):
            if i in drops:
                with torch.no_grad():  # hard top-k on detached scores: no gradient through the selection
                    scores = self._scores(i, seq, layer_input)  # (B, L)
                before = seq
                seq = seq.gather(*keep_index(scores, seq.image, drops[i], seq.query))
                if self.renumber:
                    seq.positions = (seq.mask.long().cumsum(dim=1) - 1).clamp(min=0).masked_fill(~seq.mask, 0)
                    shift = original - seq.image.sum(dim=1)
                else:
                    shift = torch.zeros_like(original)
                previous_shift = self.stages[-1].shift if self.stages else torch.zeros_like(shift)
                same = same_sequence(before, seq) and torch.equal(shift, previous_shift)
                self.stages.append(Stage(i, seq.mask, shift, same))
            if i == 0 or (i in drops and not self.stages[-1].same):
                causal = self._masks(seq.hidden, seq.mask, seq.positions, cache, i, seq.origin)
                rotary = self.decoder.rotary(seq.hidden, seq.rotary)
            counts[:, i] = seq.image.sum(dim=1)
            layer_input = seq.hidden
            if states is not None:
                states.append(seq.hidden)
            seq.hidden = self._layer(i, layer, seq.hidden, causal, seq.positions, rotary, cache, use_cache,
                                     **self.decoder.layer_inputs(i, seq.origin, extras), **kwargs)
            seq.hidden = self.decoder.after(i, seq.hidden, seq.visual, extras)  # e.g. DeepStack, on the kept slots
        self.origin = seq.origin
        self.record(counts, seq.origin)
        return seq.hidden

    def _layer(self, i, layer, hidden, causal, positions, rotary, cache, use_cache, **kwargs):
        """Decoder layer i, with its mask and rotary tables (the hook's), called with the keywords the
        installed release names (`compat`)."""
        decoder = self.decoder
        return layer(hidden, attention_mask=decoder.layer_mask(i, causal), position_ids=positions if self.pass_text else None,
                     use_cache=use_cache, position_embeddings=decoder.layer_rotary(i, rotary), **{self.cache_kw: cache},
                     **kwargs)

    def _keep_counts(self, original: torch.Tensor):
        """(layer, (B,) kept image tokens) per boundary, from each sample's ORIGINAL count."""
        per_sample = [dict(self.method.keep_counts(int(n), self.depth)) for n in original.tolist()]
        for layer in self.boundaries:
            yield layer, torch.tensor([d[layer] for d in per_sample], device=original.device)

    def _scores(self, i, seq: "Tokens", layer_input):
        """(B, L) scores of the current sequence before boundary `i`: the method's `rank` (by default
        the attention of each sample's query token(s) from the layer before or after the drop)."""
        scores = self.method.rank(i, RankingView(self.decoder, seq, i, layer_input))
        if not isinstance(scores, torch.Tensor) or scores.shape != seq.image.shape:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise TypeError(f"{type(self.method).__name__}.rank must return a (B, L) = {tuple(seq.image.shape)} tensor "
                            f"of scores, got {got}")
        return scores

    # ---- decode: static keep sets ---------------------------------------------------------------
    def decode(self, hidden, mask, positions, rope, extras, cache, use_cache, states, **kwargs):
        """One step, or a chunk of t new tokens (a later turn), on the cache of the last prefill."""
        if not self.stages and self.boundaries and self.prefill_length == 0:
            raise RuntimeError("tokendrop: decoding with a cache that this model did not prefill")
        self._check_cache(cache, mask.shape[1] - hidden.shape[1])
        self._check_chunk(hidden.shape[1])
        stage_of = {s.layer: s for s in self.stages}
        new_tail = mask[:, self.prefill_length:]  # (B, t) the caller's mask of decoded tokens
        current_mask, current_positions = mask, positions
        for i, layer in enumerate(self.lm.layers):
            if i == 0 or (i in stage_of and not stage_of[i].same):  # each distinct stage once per step
                if i in stage_of:
                    stage = stage_of[i]
                    current_mask = torch.cat([stage.mask, new_tail], dim=1)
                    current_positions = positions - stage.shift[:, None]
                causal = self._step_masks(hidden, current_mask, current_positions, cache, i)
                rotary = self.decoder.rotary(hidden, current_positions if rope is None else rope)
            if states is not None:
                states.append(hidden)
            hidden = self._layer(i, layer, hidden, causal, current_positions, rotary, cache, use_cache,
                                 **self.decoder.layer_inputs(i, None, extras), **kwargs)
        return hidden

    def _check_chunk(self, t: int) -> None:
        """Refuse image tokens among t > 1 new tokens on a filled cache: a later turn's image would reach
        the LLM unselected. (A single decoded token is what the model generated, and is decoded as such.)"""
        image = self.image_mask
        if not (t > 1 and image is not None and image.shape[1] == t and bool(image.any())):
            return
        message = (f"tokendrop: the new tokens passed with a cache hold {int(image.sum())} image tokens; in-LLM "
                   "methods (FastV, PyramidDrop) choose image tokens at the prefill only and cannot drop those of a "
                   "later turn. Generate again from the whole conversation without the cache (one prefill that "
                   "selects over every image), or remove the handle")
        first = self.decoder.length_layers[0]
        if self.stages and self.stages[0].layer <= first:  # likely the prompt's own image tokens, sent again
            message += (f". With a drop before layer {first}, the first whose cache counts tokens (FastV k=0; on a hybrid "
                        "decoder, a drop before its first full-attention layer with releases whose generate() reads "
                        "that layer's length), generate() itself sends them again when it continues a cache: it counts "
                        f"layer {first}'s entries (the kept tokens) as the conversation's length; continue with "
                        f"model(input_ids=<the new tokens>, past_key_values=cache) calls, or drop after layer {first}")
        raise ValueError(message)

    def _check_cache(self, cache, cached: int) -> None:
        """Refuse a cache that the last prefill under this handle did not fill (another conversation's,
        or one prefilled by the stock model): each layer must hold what its stage kept of that prefill
        plus the tokens that followed it, `cached` being the caller's count of tokens before this call."""
        if cache is None:
            return
        later = cached - self.prefill_length  # tokens decoded (or continued) after the prefill
        # one layer per stage (a stage's layers share their length): the first whose cache counts tokens
        starts = sorted({0, *(s.layer for s in self.stages)})
        for start, end in zip(starts, [*starts[1:], self.depth]):
            i = next((j for j in self.decoder.length_layers if start <= j < end), None)
            if i is None:
                continue
            width, held = self._width(i), self.decoder.cached(cache, i)
            if held != width + later:
                raise ValueError(
                    f"tokendrop: the cache passed holds {held} tokens in layer {i}, but the last "
                    f"prefill under this handle leaves {width + later} there ({width} kept of its "
                    f"{self.prefill_length} + {later} after it). An in-LLM method keeps the keep sets of one "
                    "conversation, the last one prefilled: continue that one, or generate again without the cache")

    def _step_masks(self, hidden, mask, positions, cache, layer_idx):
        """A decode step's masks for the stage starting at `layer_idx`: the previous step's, one key
        longer, when nothing else changed (one new token after one new token, attended, no sliding
        window); else built. A chunk of several tokens has as many query rows: built, never grown."""
        previous = self.decode_masks.pop(layer_idx, None)
        grows = (previous is not None and hidden.shape[1] == 1 and previous[1] + 1 == mask.shape[1]
                 and bool(mask[:, -1].all()) and self.decoder.grows)
        masks = {kind: extend_mask(m) for kind, m in previous[0].items()} if grows else None
        if masks is None or any(m is NotImplemented for m in masks.values()):
            masks = self._masks(hidden, mask, positions, cache, layer_idx)
        if hidden.shape[1] == 1:
            self.decode_masks[layer_idx] = (masks, mask.shape[1])
        return masks

    # ---- masks ----------------------------------------------------------------------------------
    def _masks(self, hidden, mask, positions, cache, layer_idx, origin=None):
        """The hook's masks per layer type, sized against layer `layer_idx`'s cache; `origin` (B, L) the
        caller's index of every slot of a prefill (None while decoding: the slots are the new tokens)."""
        return self.decoder.masks(hidden, mask, positions if self.pass_text else None, cache, layer_idx, origin=origin)
