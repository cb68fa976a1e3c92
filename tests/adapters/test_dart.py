"""DART against an independent reference written from the official algorithm (ZichenWen1/DART @ 5a19452fc173,
`get_retained_image_token`), with the count, pivot order and tie decisions of issue #28.

The reference reads what the official code reads from the STOCK model: layer k-1's keys after RoPE from
the stock DynamicCache (the official reads the attention's own key states) and the hidden states entering
layer k from `output_hidden_states`, through the final norm; it selects with plain Python loops and sets.
The decode reference runs the kept tokens through an eager copy of the language model with their original
positions, recomputing the whole sequence at every step without a cache.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import tokendrop as td
from sample_inputs import PROMPTS, random_image
from tokendrop.compat import output_cache
from tokendrop.families.base import resolve
from tokendrop.loading import format_prompt

STEPS = 4


# ---- the reference ---------------------------------------------------------------------------------
def official_selection(keys, states, image, text, keep, pivot_image, pivot_text):
    """Kept image positions by the official loop, with the issue's exact quotas, in the order chosen.

    Args:
        keys: (L, W) post-RoPE keys of layer k-1, heads concatenated; states: (L, D) normed states.
        image, text: lists of sequence positions (text: the tokens after the last image token).
    """
    norm = {i: float(keys[i].abs().sum()) for i in image + text}
    by_norm = sorted(image, key=lambda i: (-norm[i], i))  # topk, ties to the lower index
    if keep <= min(pivot_image, len(image)):
        return by_norm[:keep]
    image_pivots = by_norm[:pivot_image]
    text_pivots = sorted(text, key=lambda i: (-norm[i], i))[:pivot_text]
    pivots = sorted(image_pivots) + sorted(text_pivots)  # the issue: ascending sequence index
    if not pivots:
        return by_norm[:keep]
    kept = sorted(image_pivots)
    valid = [i for i in image if i not in kept]
    for p, pivot in enumerate(pivots):
        quota = (keep - len(image_pivots)) // len(pivots) + (p < (keep - len(image_pivots)) % len(pivots))
        cos = {i: float(torch.nn.functional.cosine_similarity(states[pivot], states[i], dim=0)) for i in valid}
        least = sorted(valid, key=lambda i: (cos[i], i))[:quota]
        kept += least
        valid = [i for i in valid if i not in least]
    return kept


def stock_selection(model, inputs, method):
    """(kept sequence positions, image mask (L,)) of one unpadded sample, from the stock model's own tensors."""
    lm = model.model.language_model
    with torch.no_grad():
        out = model(**inputs, use_cache=True, output_hidden_states=True)
        states = lm.norm(out.hidden_states[method.k][0])  # (L, D) entering layer k, final norm
    keys = output_cache(out).layers[method.k - 1].keys[0].transpose(0, 1).flatten(1)  # (L, Hkv * hd)
    ids = inputs["input_ids"][0]
    is_image = ids == model.config.image_token_id
    image = is_image.nonzero().squeeze(1).tolist()
    text = [i for i in range(len(ids)) if i > image[-1]]
    keep = round(len(image) * (1 - method.drop))
    return official_selection(keys, states, image, text, keep, method.pivot_image_token, method.pivot_text_token), is_image


def reference_generate(model, lm, embeds, positions, image, kept, k, steps=STEPS):
    """Greedy tokens and every step's logits: layers < k see all tokens, the rest text + `kept`, original positions."""
    logits, tokens = [], []
    with torch.no_grad():
        for _ in range(steps):
            idx = torch.arange(embeds.shape[1])
            h = embeds
            for i, layer in enumerate(lm.layers):
                if i == k:
                    keep = ~image | torch.isin(idx, torch.tensor(kept, dtype=torch.long))
                    h, idx = h[:, keep], idx[keep]
                L = h.shape[1]
                h = layer(h, attention_mask=torch.full((L, L), float("-inf")).triu(1)[None, None],
                          position_embeddings=lm.rotary_emb(h, positions[..., idx]))
            logits.append(model.lm_head(lm.norm(h)[:, -1])[0])
            tokens.append(int(logits[-1].argmax()))
            embeds = torch.cat([embeds, model.model.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
            positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
            image = torch.cat([image, torch.tensor([False])])
    return torch.tensor(tokens), torch.stack(logits)


def llava_prompt(model, inputs):
    """(embeds (1, L, D), positions (1, L)) of one unpadded LLaVA sample, as the stock forward builds them."""
    base = model.model
    embeds = base.get_input_embeddings()(inputs["input_ids"])
    sizes = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
    with torch.no_grad():
        features = base.get_image_features(inputs["pixel_values"], **sizes).pooler_output
    mask = (inputs["input_ids"] == model.config.image_token_id)[..., None]
    return embeds.masked_scatter(mask, torch.cat(features).to(embeds.dtype)), torch.arange(embeds.shape[1])[None]


def qwen_prompt(model, inputs):
    """(embeds (1, L, D), M-RoPE positions (3, 1, L)) of one Qwen2.5-VL sample, as the stock forward builds them."""
    base = model.model
    ids = inputs["input_ids"]
    embeds = base.get_input_embeddings()(ids).clone()
    with torch.no_grad():
        features = type(base).get_image_features(base, inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    embeds[0, ids[0] == model.config.image_token_id] = torch.cat(features)
    positions, _ = type(base).get_rope_index(base, ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"])
    return embeds, positions


def kept_of(handle, i=0):
    """Caller positions a sample kept (padding slots dropped)."""
    return [p for p in handle.kept_positions[i].tolist() if p >= 0]


def generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                              output_logits=True)


def step_logits(out, i):
    return torch.stack([step[i] for step in out.logits])


# ---- models ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen25():
    from tokendrop.registry import families

    family = next(f for f in families() if f.name == "qwen2.5-vl")
    model, processor = resolve(family.tiny)()
    return model, processor


def llava_case(request, name, prompt=PROMPTS[0], size=(150, 300)):
    model, processor = request.getfixturevalue(name)
    inputs = processor(images=[random_image(*size)], text=[prompt], return_tensors="pt")
    return model, processor, inputs, llava_prompt


def qwen_case(request, question="what is it?"):
    model, processor = request.getfixturevalue("qwen25")
    inputs = processor(images=[random_image(150, 200)], text=[format_prompt(processor, question)], return_tensors="pt")
    return model, processor, inputs, qwen_prompt


CASES = {"llava-1.5": lambda r: llava_case(r, "llava_model"), "llava-next": lambda r: llava_case(r, "next_model"),
         "qwen2.5-vl": qwen_case}
SETTINGS = [td.DART(), td.DART(k=1, drop=0.5, pivot_image_token=2, pivot_text_token=3),
            td.DART(k=3, drop=0.9, pivot_image_token=3, pivot_text_token=5)]


@contextlib.contextmanager
def uneven_final_norm(model):
    """The final norm's weights made uneven (a random init leaves them all 1, where normed and raw states
    have the same cosines), restored afterwards."""
    weight = model.model.language_model.norm.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) * 2)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


# ---- the selection ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", SETTINGS, ids=repr)
@pytest.mark.parametrize("case", CASES)
def test_selection_equals_the_official_algorithm(request, case, method):
    model, processor, inputs, _ = CASES[case](request)
    with uneven_final_norm(model):
        kept, image = stock_selection(model, inputs, method)
        with td.apply(model, processor, method) as handle, torch.no_grad():
            model(**inputs)
    text = (~image).nonzero().squeeze(1).tolist()
    assert kept_of(handle) == sorted(text + kept)
    assert len(kept) == len(set(kept)) == handle.layer_tokens[0, -1] == round(int(image.sum()) * (1 - method.drop))


@pytest.mark.parametrize("case", CASES)
def test_decode_logits_equal_a_no_cache_reference_loop(request, case):
    model, processor, inputs, prompt = CASES[case](request)
    method = td.DART()
    kept, image = stock_selection(model, inputs, method)
    eager = copy.deepcopy(model.model.language_model)
    eager.set_attn_implementation("eager")
    embeds, positions = prompt(model, inputs)
    tokens, logits = reference_generate(model, eager, embeds, positions, image, kept, method.k)
    with td.apply(model, processor, method) as handle:
        out = generate(model, inputs)
        assert handle.layer_tokens[0].tolist() == method.layer_counts(int(image.sum()), len(eager.layers))
    assert torch.equal(out.sequences[0, inputs["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(step_logits(out, 0), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", [td.DART(drop=0.5), td.DART(drop=0.995), td.DART(drop=0.99, pivot_image_token=0),
                                    td.DART(pivot_text_token=0), td.DART(pivot_image_token=0, pivot_text_token=0)],
                         ids=repr)
@pytest.mark.parametrize("prompt", ["Describe: <image>", "<image>\nQ: what? A:"])
def test_edge_cases_equal_the_reference_with_exact_counts(next_model, method, prompt):
    # "Describe: <image>": no text after the image (no text pivot; the last image token is the query)
    model, processor = next_model
    inputs = processor(images=[random_image(224, 224)], text=[prompt], return_tensors="pt")
    kept, image = stock_selection(model, inputs, method)
    n = int(image.sum())
    with td.apply(model, processor, method) as handle, torch.no_grad():
        model(**inputs)
    assert handle.layer_tokens[0, -1] == round(n * (1 - method.drop)) == len(kept)
    last = inputs["input_ids"].shape[1] - 1
    if image[last] and last not in kept and kept:  # the query is always kept, in the slot of DART's last choice
        kept = kept[:-1] + [last]
    assert kept_of(handle) == sorted((~image).nonzero().squeeze(1).tolist() + kept)


def test_padded_batch_equals_one_by_one(next_model, images):
    model, processor = next_model
    method = td.DART(drop=0.6)
    prompts = [PROMPTS[0], "Q: just text here? A:", PROMPTS[2]]
    batch = processor(images=[images[0], images[2]], text=prompts, return_tensors="pt", padding=True)
    with td.apply(model, processor, method) as handle:
        out = generate(model, batch)
        pad = batch["input_ids"].shape[1] - batch["attention_mask"].sum(dim=1)  # (B,) left padding
        batch_kept = [[p - int(pad[i]) for p in kept_of(handle, i) if p >= pad[i]] for i in range(3)]
        for i, image in enumerate([[images[0]], None, [images[2]]]):
            single = processor(images=image, text=[prompts[i]], return_tensors="pt")
            alone = generate(model, single)
            assert batch_kept[i] == kept_of(handle), i  # the handle holds the last prefill: this sample alone
            assert torch.equal(out.sequences[i, batch["input_ids"].shape[1]:], alone.sequences[0, single["input_ids"].shape[1]:])
            torch.testing.assert_close(step_logits(out, i), step_logits(alone, 0), atol=1e-4, rtol=1e-4)


def test_keep_all_is_the_stock_model(next_model, images):
    model, processor = next_model
    batch = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    stock = generate(model, batch)
    with td.apply(model, processor, td.DART(drop=0.0)):
        ours = generate(model, batch)
    assert torch.equal(ours.sequences, stock.sequences)
    for a, b in zip(ours.logits, stock.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_k0_ranks_by_layer_0_and_the_embeddings(next_model, images):
    model, processor = next_model
    inputs = processor(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    method = td.DART(k=0, drop=0.5)
    lm = model.model.language_model
    with torch.no_grad():
        out = model(**inputs, use_cache=True, output_hidden_states=True)
        embedded = lm.norm(out.hidden_states[0][0])  # (L, D) the embeddings, final norm
    keys = output_cache(out).layers[0].keys[0].transpose(0, 1).flatten(1)
    image = inputs["input_ids"][0] == model.config.image_token_id
    at = image.nonzero().squeeze(1).tolist()
    kept = official_selection(keys, embedded, at, [i for i in range(len(image)) if i > at[-1]],
                              round(len(at) * 0.5), 4, 4)
    with td.apply(model, processor, method) as handle, torch.no_grad():
        model(**inputs)
    assert kept_of(handle) == sorted((~image).nonzero().squeeze(1).tolist() + kept)
