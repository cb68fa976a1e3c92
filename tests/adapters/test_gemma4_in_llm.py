"""Gemma 4 in-LLM (FastV, PyramidDrop, DART) against a plain reference loop written here.

The reference runs one unpadded sample at a time through an EAGER copy of the language model,
without a cache, recomputing the whole sequence at every step with the keep sets chosen on the
prompt. It builds what the stock `Gemma4Model` builds, independently: the prompt embeddings with
the image features, the per-layer inputs (projected from the embeddings, one row per token and
layer, each kept token keeping its own), a rotary table per layer type, and the masks as dense
additive tensors: full layers causal, sliding layers AND(the last `sliding_window` slots,
OR(causal, same image block)) on the prefill, the block ids being runs of image tokens in the
caller's prompt, gathered with the kept tokens. Ranking follows the documented rule: the query's
attention row over every earlier token (no window, no block), as on Mistral (docs/design.md).
"""

from __future__ import annotations

import copy

import pytest
import torch

import tokendrop as td
from sample_inputs import random_image
from test_dart import official_selection
from test_gemma4 import encode

try:  # below 5.21, transformers' Gemma 4 processor imports torchvision
    from tokendrop.families.gemma4.tiny import tiny_gemma4

    tiny_gemma4()
except ImportError as err:  # pragma: no cover - the floor's environment without torchvision
    pytest.skip(f"Gemma 4's processor: {err}", allow_module_level=True)

STEPS = 4
METHODS = [td.FastV(k=2, drop=0.5), td.FastV(k=1, drop=0.75, positions="renumber"),
           td.PyramidDrop(layers=(1, 3), ratio=0.5), td.PyramidDrop(layers=(2,), ratio=0.3, score_layer="last"),
           td.DART(k=2, drop=0.5)]


@pytest.fixture(scope="module")
def gemma():
    model, processor = tiny_gemma4()
    eager = copy.deepcopy(model.model.language_model)
    eager.set_attn_implementation("eager")
    return model, processor, eager


# ---- the reference -----------------------------------------------------------------------------------
def prompt(model, inputs):
    """(embeddings (1, L, D), raw per-layer inputs (1, L, n, P), image (L,) bool, block id (L,)) of one sample."""
    base, ids = model.model, inputs["input_ids"]
    image = ids[0] == model.config.image_token_id
    text_ids = ids.masked_fill(image[None], model.config.get_text_config().pad_token_id)  # as the stock model embeds
    embeds = base.get_input_embeddings()(text_ids)
    if image.any():
        features = base.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output
        embeds = embeds.masked_scatter(image[None, :, None], torch.cat(features).to(embeds.dtype))
    vision = inputs["mm_token_type_ids"][0] > 0
    starts = vision & ~torch.cat([torch.tensor([False]), vision[:-1]])
    block = torch.where(vision, starts.long().cumsum(0) - 1, -1)
    return embeds, base.language_model.get_per_layer_inputs(text_ids, embeds), image, block


def masks(lm, block, prefill: bool):
    """Dense additive (1, 1, L, L) masks per layer type of a sequence whose slots have image `block` ids."""
    n = len(block)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None]
    same = (block[:, None] == block[None]) & (block[:, None] >= 0) if prefill else torch.zeros(n, n, dtype=torch.bool)
    allowed = {"full_attention": k <= q, "sliding_attention": ((k <= q) | same) & (k > q - lm.config.sliding_window)}
    return {kind: torch.zeros(n, n).masked_fill(~a, float("-inf"))[None, None] for kind, a in allowed.items()}


def attention_row(layer, x, pos, kind, lm):
    """(L,) the last token's attention over every earlier token in `layer` (mean over heads)."""
    _, weights = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=lm.rotary_emb(x, pos, kind),
                                 attention_mask=masks(lm, torch.full((x.shape[1],), -1), False)["full_attention"],
                                 shared_kv_states={})
    return weights[0, :, -1].mean(dim=0)


def rotary_keys(layer, x, pos, kind, lm):
    """(L, W) the layer's keys after its norm and rotary, heads concatenated."""
    attn = layer.self_attn
    keys = attn.k_norm(attn.k_proj(layer.input_layernorm(x)).view(*x.shape[:2], -1, attn.head_dim))
    cos, sin = lm.rotary_emb(x, pos, kind)
    rotated = keys * cos[:, :, None] + torch.cat([-keys[..., attn.head_dim // 2:], keys[..., :attn.head_dim // 2]],
                                                 dim=-1) * sin[:, :, None]
    return rotated[0].flatten(1)


def choose(lm, method, i, keep, h, previous, idx, pos, image):
    """Kept original indices of the image tokens before layer i."""
    kinds = lm.config.layer_types
    at = image[idx].nonzero().squeeze(1)  # slots of image tokens
    if len(at) == 0:  # a text-only prompt
        return idx[:0]
    if isinstance(method, td.DART):
        keys = rotary_keys(lm.layers[i - 1], previous, pos, kinds[i - 1], lm)
        text = [s for s in range(len(idx)) if s > int(at[-1])]
        kept = official_selection(keys, lm.norm(h)[0], at.tolist(), text, keep, method.pivot_image_token,
                                  method.pivot_text_token)
        return idx[torch.tensor(kept, dtype=torch.long)]
    layer = method.ranking_layer(i)
    row = attention_row(lm.layers[layer], previous if layer < i else h, pos, kinds[layer], lm)
    query, others = at[at == len(idx) - 1], at[at != len(idx) - 1]
    top = torch.argsort(row[others], descending=True, stable=True)[: keep - len(query)]
    return idx[torch.cat([query, others[top]])]


def reference_forward(lm, embeds, per_layer, image, block, method, chosen, prefill=True):
    """Last-position hidden state of one sample; fills `chosen` (layer -> kept original indices) when empty."""
    drops = dict(method.keep_counts(int(image.sum()), len(lm.layers)))
    renumber = method.positions in ("renumber", None)
    rows = lm.project_per_layer_inputs(embeds, per_layer)  # (1, L, n, P)
    h, idx, previous = embeds, torch.arange(embeds.shape[1]), None
    kinds = lm.config.layer_types
    for i, layer in enumerate(lm.layers):
        pos = (torch.arange(len(idx)) if renumber else idx)[None]
        if i in drops:
            if i not in chosen:
                chosen[i] = choose(lm, method, i, drops[i], h, previous, idx, pos, image)
            keep = ~image[idx] | torch.isin(idx, chosen[i])
            h, idx = h[:, keep], idx[keep]
            pos = (torch.arange(len(idx)) if renumber else idx)[None]
        previous = h
        h = layer(h, rows[:, idx, i], shared_kv_states={}, position_embeddings=lm.rotary_emb(h, pos, kinds[i]),
                  attention_mask=masks(lm, block[idx], prefill)[kinds[i]], position_ids=pos)
    return lm.norm(h)[:, -1]


def reference_generate(model, lm, inputs, method, steps=STEPS, reselect=False):
    """Greedy tokens and every step's logits; `reselect`: every step is a prefill that selects again."""
    softcap = model.config.get_text_config().final_logit_softcapping
    with torch.no_grad():
        embeds, per_layer, image, block = prompt(model, inputs)
        chosen, tokens, logits = {}, [], []
        for _ in range(steps):
            if reselect:
                chosen = {}
            hidden = reference_forward(lm, embeds, per_layer, image, block, method, chosen)
            logits.append(torch.tanh(model.lm_head(hidden)[0] / softcap) * softcap)
            tokens.append(int(logits[-1].argmax()))
            new = torch.tensor([[tokens[-1]]])
            embeds = torch.cat([embeds, model.model.get_input_embeddings()(new)], dim=1)
            per_layer = torch.cat([per_layer, lm.get_per_layer_inputs(new, None)], dim=1)
            image, block = torch.cat([image, torch.tensor([False])]), torch.cat([block, torch.tensor([-1])])
    return torch.tensor(tokens), torch.stack(logits)


def step_logits(out, i):
    return torch.stack([step[i] for step in out.logits])


RUN = dict(max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)


# ---- the tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_cached_generate_equals_the_no_cache_reference_batch_1(gemma, method):
    model, processor, eager = gemma
    inputs = encode(processor, [random_image(150, 300, seed=1)])
    tokens, logits = reference_generate(model, eager, inputs, method)
    with td.apply(model, processor, method) as handle, torch.no_grad():
        out = model.generate(**inputs, **RUN)
        n = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert handle.layer_tokens[0].tolist() == method.layer_counts(n, len(eager.layers))
    assert torch.equal(out.sequences[0, inputs["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(step_logits(out, 0), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS[::2], ids=repr)
def test_left_padded_batch_equals_the_reference_per_sample(gemma, method):
    # different image sizes, and a text-only prompt
    model, processor, eager = gemma
    images = [random_image(150, 300, seed=2), None, random_image(224, 224, seed=3)]
    questions = ["what is it?", "just text, no image here, but a longer question?", "how many?"]
    batch = encode(processor, images, questions)
    assert not batch["attention_mask"].all()  # left padding
    with td.apply(model, processor, method), torch.no_grad():
        out = model.generate(**batch, **RUN)
    for i, (image, question) in enumerate(zip(images, questions)):
        tokens, logits = reference_generate(model, eager, encode(processor, [image], [question]), method)
        assert torch.equal(out.sequences[i, batch["input_ids"].shape[1]:], tokens), i
        torch.testing.assert_close(step_logits(out, i), logits, atol=1e-4, rtol=1e-4)


def test_the_reference_is_the_stock_model_when_nothing_is_dropped(gemma):
    """The reference's masks, per-layer inputs and rotary are the stock model's (else the tests above prove little)."""
    model, processor, eager = gemma
    inputs = encode(processor, [random_image(150, 300, seed=4)])
    tokens, logits = reference_generate(model, eager, inputs, td.FastV(k=2, drop=0.0))
    with torch.no_grad():
        out = model.generate(**inputs, **RUN)
    assert torch.equal(out.sequences[0, inputs["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(step_logits(out, 0), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", [td.FastV(k=2, drop=0.0), td.PyramidDrop(layers=(1, 3), ratio=1.0)], ids=repr)
def test_keep_all_is_the_stock_model_token_for_token(gemma, method):
    model, processor, _ = gemma
    batch = encode(processor, [random_image(150, 300, seed=5), random_image(40, 600, seed=6)])
    with torch.no_grad():
        stock = model.generate(**batch, **RUN)
        with td.apply(model, processor, method):
            out = model.generate(**batch, **RUN)
    assert torch.equal(out.sequences, stock.sequences)
    for a, b in zip(out.logits, stock.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_generate_without_cache_selects_again_at_every_step(gemma):
    """The documented rule: a forward without a cache is a prefill, which selects again."""
    model, processor, eager = gemma
    method = td.PyramidDrop(layers=(1, 3), ratio=0.5)
    inputs = encode(processor, [random_image(150, 300, seed=7)])
    tokens, logits = reference_generate(model, eager, inputs, method, reselect=True)
    with td.apply(model, processor, method), torch.no_grad():
        out = model.generate(**inputs, use_cache=False, **RUN)
    assert torch.equal(out.sequences[0, inputs["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(step_logits(out, 0), logits, atol=1e-4, rtol=1e-4)


def test_remove_restores_the_model_bit_for_bit(gemma):
    model, processor, _ = gemma
    inputs = encode(processor, [random_image(150, 300, seed=8)])
    lm = model.model.language_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = set(vars(lm)), set(vars(model.model))
    with torch.no_grad():
        stock = model(**inputs).logits
        handle = td.apply(model, processor, td.FastV(k=2, drop=0.5))
        model(**inputs)
        handle.remove()
        after = model(**inputs).logits
    assert torch.equal(stock, after)
    assert (set(vars(lm)), set(vars(model.model))) == before and "forward" not in vars(lm)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---- KV sharing ----------------------------------------------------------------------------------------
def shared_config(model, shared: int):
    config = copy.deepcopy(model.config)
    config.text_config.num_kv_shared_layers = shared
    return config


@pytest.mark.parametrize("method, shared, says", [
    (td.PyramidDrop(layers=(2,), ratio=0.5), 1, "KV-shared layer 3 reuses the keys layer 1 stored"),
    (td.FastV(k=3, drop=0.5), 1, "KV-shared layer 3 reuses the keys layer 1 stored"),
    (td.FastV(k=3, drop=0.5), 2, "ranks with layer 2, a KV-shared layer")], ids=repr)
def test_a_drop_after_a_key_storing_layer_is_refused_on_kv_shared_checkpoints(gemma, method, shared, says):
    # 4 layers sliding, full, sliding, full; with the last one shared, layer 1 stores the full layers' keys
    from tokendrop.families.gemma4.gemma4 import Gemma4Adapter

    model, _, _ = gemma
    with pytest.raises(ValueError, match=says):
        Gemma4Adapter.config_check(shared_config(model, shared), method)
    Gemma4Adapter.config_check(model.config, method)  # without shared layers: allowed
    Gemma4Adapter.config_check(shared_config(model, shared), td.FastV(k=0, drop=0.5))  # before the storing layers
