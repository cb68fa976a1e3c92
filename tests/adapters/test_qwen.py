"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: in-LLM and pre-LLM dropping against plain reference loops.

The in-LLM reference runs one unpadded sample through an EAGER copy of the text model, with the
stock 3-D positions (`get_rope_index` on the full input) and, for Qwen3-VL, the DeepStack features
added after the first layers; it reads the score from the attention weights the layer returns,
keeps the chosen image tokens with their original positions, and recomputes everything at every
generation step without a cache (new tokens continue at the last position + 1).
The pre-LLM reference is the STOCK model fed the kept feature rows through `mm_encoder_outputs`
and the stock positions of the full input gathered at the kept slots.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tokendrop as td
from sample_inputs import random_image
from tokendrop.families.base import resolve
from tokendrop.loading import format_prompt
from tokendrop.registry import family_for

QWEN = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
SIZES = [(150, 200), (100, 300), (200, 140)]
STEPS = 4


@pytest.fixture(scope="module", params=QWEN)
def qwen(request):
    from tokendrop.registry import families

    family = next(f for f in families() if f.name == request.param)
    model, processor = resolve(family.tiny)()
    eager = copy.deepcopy(model.model.language_model)
    eager.set_attn_implementation("eager")
    return model, processor, eager


def encode(processor, images, questions=("what is it?",)):
    texts = [format_prompt(processor, q) for q in questions]
    return processor(images=images or None, text=texts, return_tensors="pt", padding=True)


def causal(length):
    return torch.full((length, length), float("-inf")).triu(1)[None, None]


def step_logits(out, i):
    return torch.stack([step[i] for step in out.logits])


# ---- the stock pieces of one sample ---------------------------------------------------------------
def stock_prompt(model, inputs):
    """(embeds (1, L, D), positions (3, 1, L), image slots (L,), DeepStack levels or None) of one sample."""
    base = model.model
    ids = inputs["input_ids"]
    embeds = base.get_input_embeddings()(ids)
    image = ids[0] == model.config.image_token_id
    deep = None
    if image.any():
        with torch.no_grad():
            out = type(base).get_image_features(base, inputs["pixel_values"], inputs["image_grid_thw"])
        embeds = embeds.clone()
        embeds[0, image] = torch.cat(out.pooler_output)
        if getattr(out, "deepstack_features", None) is not None:
            deep = [torch.cat(level) for level in out.deepstack_features]
        positions, _ = type(base).get_rope_index(base, ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                                 image_grid_thw=inputs["image_grid_thw"])
    else:
        positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    return embeds, positions, image, deep


def reference_forward(lm, embeds, positions, image, deep, method, chosen):
    """Last-position hidden state; fills `chosen` (layer -> kept original indices) on the first call."""
    depth = len(lm.layers)
    drops = dict(method.keep_counts(int(image.sum()), depth))
    visual_row = torch.cumsum(image.long(), 0) - 1  # the row of every image slot in the DeepStack features
    h, idx, previous = embeds, torch.arange(embeds.shape[1]), embeds
    kinds = getattr(lm.config, "layer_types", None) or ["full_attention"] * depth  # Qwen3.5: linear attention too
    for i, layer in enumerate(lm.layers):
        if i in drops:
            if i not in chosen:
                scorer_at = method.ranking_layer(i)
                scorer, x = lm.layers[scorer_at], (previous if scorer_at == i - 1 else h)
                _, weights = scorer.self_attn(hidden_states=scorer.input_layernorm(x), attention_mask=causal(x.shape[1]),
                                              position_embeddings=lm.rotary_emb(x, positions[:, :, idx]))
                row = weights[0, :, -1].mean(dim=0)  # the last prompt token, mean over heads
                image_at = image[idx].nonzero().squeeze(1)
                top = torch.argsort(row[image_at], descending=True, stable=True)[: drops[i]]
                chosen[i] = idx[image_at[top]]
            keep = ~image[idx] | torch.isin(idx, chosen[i])
            h, idx = h[:, keep], idx[keep]
        previous = h
        mask = None if kinds[i] == "linear_attention" else causal(h.shape[1])  # one unpadded sample: no 2-D mask
        h = layer(h, attention_mask=mask, position_embeddings=lm.rotary_emb(h, positions[:, :, idx]))
        if deep is not None and i < len(deep):
            slots = image[idx]
            h = h.clone()
            h[0, slots] = h[0, slots] + deep[i][visual_row[idx[slots]]]
    return lm.norm(h)[:, -1]


def reference_generate(model, lm, inputs, method, steps=STEPS):
    """Greedy tokens and every step's logits, everything recomputed per step without a cache."""
    with torch.no_grad():
        embeds, positions, image, deep = stock_prompt(model, inputs)
        chosen, tokens, logits = {}, [], []
        for _ in range(steps):
            logits.append(model.lm_head(reference_forward(lm, embeds, positions, image, deep, method, chosen))[0])
            tokens.append(int(logits[-1].argmax()))
            embeds = torch.cat([embeds, model.model.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
            positions = torch.cat([positions, positions[:, :, -1:] + 1], dim=2)
            image = torch.cat([image, torch.tensor([False])])
    return torch.tensor(tokens), torch.stack(logits)


METHODS = [td.FastV(k=2, drop=0.5), td.PyramidDrop(layers=(1, 3), ratio=0.5), td.FastV(k=1, drop=0.75)]


# ---- in-LLM ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_in_llm_equals_the_reference_at_batch_1(qwen, method):
    model, processor, eager = qwen
    inputs = encode(processor, [random_image(*SIZES[0])])
    tokens, logits = reference_generate(model, eager, inputs, method)
    with td.apply(model, processor, method) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        n = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert handle.layer_tokens[0].tolist() == method.layer_counts(n, len(eager.layers))
    assert torch.equal(out.sequences[0, inputs["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(step_logits(out, 0), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS[:2], ids=repr)
def test_in_llm_padded_batch_of_3_equals_the_reference_per_sample(qwen, method):
    # mixed image sizes, and the middle sample has no image at all
    model, processor, eager = qwen
    images = [random_image(*SIZES[0], seed=0), random_image(*SIZES[2], seed=2)]
    questions = ["<|vision_start|><|image_pad|><|vision_end|>what is it?", "just text, no image here?",
                 "<|vision_start|><|image_pad|><|vision_end|>how many?"]
    batch = processor(images=images, text=questions, return_tensors="pt", padding=True)
    with td.apply(model, processor, method) as handle, torch.no_grad():
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        assert handle.layer_tokens[1].sum() == 0
    singles = [([images[0]], questions[0]), ([], questions[1]), ([images[1]], questions[2])]
    for i, (image, question) in enumerate(singles):
        single = processor(images=image or None, text=[question], return_tensors="pt")
        tokens, logits = reference_generate(model, eager, single, method)
        assert torch.equal(out.sequences[i, batch["input_ids"].shape[1]:], tokens), i
        torch.testing.assert_close(step_logits(out, i), logits, atol=1e-4, rtol=1e-4)


def test_in_llm_two_images_in_one_sample_are_one_pool(qwen):
    model, processor, eager = qwen
    images = [random_image(*SIZES[0], seed=0), random_image(*SIZES[1], seed=1)]
    question = "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>which is bigger?"
    inputs = processor(images=images, text=[question], return_tensors="pt")
    method = td.FastV(k=2, drop=0.5)
    tokens, logits = reference_generate(model, eager, inputs, method)
    with td.apply(model, processor, method), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    assert torch.equal(out.sequences[0, inputs["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(step_logits(out, 0), logits, atol=1e-4, rtol=1e-4)


def test_renumbering_is_refused_on_m_rope(qwen):
    model, processor, _ = qwen
    for method in (td.PyramidDrop(positions="renumber"), td.FastV(positions="renumber")):
        with pytest.raises(ValueError, match="capability 'renumber'.*M-RoPE"):
            td.apply(model, processor, method)
    assert td.PyramidDrop().positions is None  # the default keeps 3-D positions on these models


# ---- pre-LLM -----------------------------------------------------------------------------------------
def reference_pre_llm_logits(model, inputs, kept_images, short_inputs, extra: int = 0):
    """Last-position logits of the STOCK model fed the kept rows and the gathered stock positions
    (`extra` generated tokens after the prompt continue at the last position + 1, + 2, ...)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    base = model.model
    with torch.no_grad():
        out = type(base).get_image_features(base, inputs["pixel_values"], inputs["image_grid_thw"])
        full_positions, _ = type(base).get_rope_index(base, inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                                      image_grid_thw=inputs["image_grid_thw"])
    image = inputs["input_ids"][0] == model.config.image_token_id
    slots, start = [], 0  # the kept slots of the full input, in order
    for i, rows in enumerate(out.pooler_output):
        first = int(image.nonzero()[start])
        slots.append(first + kept_images[i])
        start += rows.shape[0]
    keep = ~image
    keep[torch.cat(slots)] = True
    positions = full_positions[:, :, keep]  # (3, 1, L')
    positions = torch.cat([positions, positions[:, :, -1:] + torch.arange(1, extra + 1)], dim=2)
    text = torch.arange(positions.shape[-1])[None, None]
    encoder = BaseModelOutputWithPooling(pooler_output=[r[k] for r, k in zip(out.pooler_output, kept_images)])
    if getattr(out, "deepstack_features", None) is not None:
        encoder.deepstack_features = [[f[k] for f, k in zip(level, kept_images)] for level in out.deepstack_features]
    with torch.no_grad():
        logits = model(input_ids=short_inputs["input_ids"], attention_mask=short_inputs["attention_mask"],
                       position_ids=torch.cat([text, positions]), mm_encoder_outputs={"image": encoder}).logits
    return logits[0, -1], positions[:, :, : positions.shape[-1] - extra]


@pytest.mark.parametrize("method", [td.RandomDrop(0.3, seed=1), td.SpatialDrop(0.5)], ids=repr)
def test_pre_llm_counts_positions_and_logits(qwen, method):
    model, processor, _ = qwen
    image = random_image(*SIZES[1])
    full = encode(processor, [image])
    with td.apply(model, processor, method) as handle:
        short = encode(processor, [image])
        n = int((short["input_ids"] == model.config.image_token_id).sum())
        assert n == handle.num_tokens((image.height, image.width)) < int((full["input_ids"] == model.config.image_token_id).sum())
        with torch.no_grad():  # generate first: its positions are computed before the encoder has chosen
            out = model.generate(**short, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
            deltas = model.model.rope_deltas.clone()
            ours = model(**short).logits[0, -1]
        kept = handle.selections[0]
    assert kept.shape[0] == n
    layout = family_for(model).processor_geometry(processor).input_layout(full, 0)[0]
    flat = kept[:, 1] * layout.cols + kept[:, 2]
    expected, positions = reference_pre_llm_logits(model, full, [flat], short)  # the stock model, unpatched
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits[0][0], expected, atol=1e-4, rtol=1e-4)  # generate: the same first logits
    assert int(deltas[0]) == int(positions.max()) + 1 - positions.shape[-1]  # decoding continues at the original max + 1
    # the second step: the stock model on prompt + first token, that token at the last position + 1
    first = out.sequences[:, -2:-1]
    longer = {"input_ids": torch.cat([short["input_ids"], first], dim=1),
              "attention_mask": torch.cat([short["attention_mask"], torch.ones_like(first)], dim=1)}
    second, _ = reference_pre_llm_logits(model, full, [flat], longer, extra=1)
    torch.testing.assert_close(out.logits[1][0], second, atol=1e-4, rtol=1e-4)


def test_pre_llm_keep_all_is_the_stock_model(qwen):
    model, processor, _ = qwen
    images = [random_image(*size, seed=i) for i, size in enumerate(SIZES)]
    batch = encode(processor, images, ["what?", "how many squares are there?", "colour?"])
    with torch.no_grad():
        stock = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        with td.apply(model, processor, td.RandomDrop(1.0)):
            again = encode(processor, images, ["what?", "how many squares are there?", "colour?"])
            assert torch.equal(again["input_ids"], batch["input_ids"])
            ours = model.generate(**again, max_new_tokens=3, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    assert torch.equal(ours.sequences, stock.sequences)
    for a, b in zip(ours.logits, stock.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [td.RandomDrop(0.3), td.SpatialDrop(0.4)], ids=repr)
def test_pre_llm_batch_equals_one_by_one(qwen, method):
    model, processor, _ = qwen
    images = [random_image(*size, seed=i) for i, size in enumerate(SIZES)]
    questions = ["what?", "how many squares are there?", "colour?"]
    with td.apply(model, processor, method), torch.no_grad():
        batch = model.generate(**encode(processor, images, questions), max_new_tokens=3, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
        for i in range(3):
            single = model.generate(**encode(processor, [images[i]], [questions[i]]), max_new_tokens=3, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
            torch.testing.assert_close(step_logits(batch, i), step_logits(single, 0), atol=1e-4, rtol=1e-4)


def test_pre_llm_then_in_llm(qwen):
    model, processor, _ = qwen
    with td.apply(model, processor, td.SpatialDrop(0.5), td.FastV(k=1, drop=0.5)) as handle, torch.no_grad():
        inputs = encode(processor, [random_image(*SIZES[0])])
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        n = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert handle.layer_tokens[0, 0] == n and handle.layer_tokens[0, -1] == round(n * 0.5)


def test_methods_that_need_what_qwen_lacks_are_refused_by_name(qwen):
    model, processor, _ = qwen
    with pytest.raises(ValueError, match=r"\[CLS\] token \(capability 'cls_token'\)"):
        td.apply(model, processor, td.HiRED(0.2))
    with pytest.raises(ValueError, match="capability 'base_image'"):
        td.apply(model, processor, td.BaseOnly())


def test_video_inputs_are_refused_by_pre_llm_methods(qwen):
    model, processor, _ = qwen
    inputs = encode(processor, [random_image(*SIZES[0])])
    grid = inputs["image_grid_thw"]
    with td.apply(model, processor, td.RandomDrop(0.5)):
        with pytest.raises(ValueError, match="video inputs are not supported"):
            model(input_ids=inputs["input_ids"], pixel_values_videos=inputs["pixel_values"], video_grid_thw=grid)


def video_inputs(model, processor):
    """A one-frame video built from an image's patches (no torchvision here to decode real videos)."""
    inputs = encode(processor, [random_image(*SIZES[0])])
    image = inputs["input_ids"] == model.config.image_token_id
    ids = inputs["input_ids"].masked_fill(image, model.config.video_token_id)
    return {"input_ids": ids, "attention_mask": inputs["attention_mask"], "mm_token_type_ids": inputs["mm_token_type_ids"] * 2,
            "pixel_values_videos": inputs["pixel_values"], "video_grid_thw": inputs["image_grid_thw"]}


def test_in_llm_methods_drop_video_tokens_like_image_tokens(qwen):
    model, processor, _ = qwen
    inputs = video_inputs(model, processor)
    n = int((inputs["input_ids"] == model.config.video_token_id).sum())
    with torch.no_grad():
        stock = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        with td.apply(model, processor, td.FastV(k=1, drop=0.0)):  # keep-all: the stock model
            same = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        with td.apply(model, processor, td.FastV(k=1, drop=0.5)) as handle:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert handle.layer_tokens[0].tolist() == [n] + [round(n * 0.5)] * (len(handle.layer_tokens[0]) - 1)
    assert torch.equal(same.sequences, stock.sequences)
    for a, b in zip(same.logits, stock.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- generate() expanding prompts: beams, several sequences per prompt --------------------------------
@pytest.mark.parametrize("settings", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2),
                                      dict(do_sample=True, num_return_sequences=2)], ids=["beams", "beams-2seq", "sample-2seq"])
def test_expanded_prompts_at_keep_all_equal_stock(qwen, settings):
    model, processor, _ = qwen
    images = [random_image(*SIZES[0]), random_image(*SIZES[1], seed=1)]
    processor.tokenizer.padding_side = "left"
    inputs = encode(processor, images, ("what is it?", "and the big one, what colour is it?"))
    run = lambda: (torch.manual_seed(0), model.generate(**inputs, max_new_tokens=3, **settings))[1]  # noqa: E731
    with torch.no_grad():
        stock = run()
        with td.apply(model, processor, td.RandomDrop(1.0)):
            same = run()
    assert torch.equal(same, stock)


def test_expanded_rows_see_their_prompts_kept_tokens(qwen):
    """Each of the r rows generate() makes of a prompt gets that prompt's kept rows and positions:
    its first-step logits equal the unexpanded run's."""
    model, processor, _ = qwen
    images = [random_image(*SIZES[0]), random_image(*SIZES[2], seed=2)]
    processor.tokenizer.padding_side = "left"
    first = lambda **kw: model.generate(**inputs, max_new_tokens=1, output_logits=True,  # noqa: E731
                                        return_dict_in_generate=True, **kw).logits[0]
    with torch.no_grad(), td.apply(model, processor, td.RandomDrop(0.5)) as handle:
        inputs = encode(processor, images, ("what is it?", "and the big one, what colour is it?"))
        once = first(do_sample=False)
        kept = [s.clone() for s in handle.selections]
        torch.manual_seed(0)
        twice = first(do_sample=True, num_return_sequences=2)
        assert all(torch.equal(a, b) for a, b in zip(handle.selections, kept))
    torch.testing.assert_close(twice, once.repeat_interleave(2, dim=0), atol=1e-5, rtol=1e-5)


def test_images_per_row_follows_generates_expansion():
    from tokendrop.families.qwen_vl.common import images_per_row

    assert images_per_row([1, 2, 0], 3) == [[0], [1, 2], []]
    assert images_per_row([1, 1, 2, 2, 0, 0], 3) == [[0], [0], [1, 2], [1, 2], [], []]  # r = 2
    with pytest.raises(RuntimeError, match="do not match"):
        images_per_row([1, 2], 2)  # 3 runs, 2 images, no expansion explains it


@pytest.mark.parametrize("with_image, token_types", [(False, True), (True, True), (False, False)],
                         ids=["video", "image+video", "video-without-mm_token_type_ids"])
@pytest.mark.parametrize("call", ["generate", "forward"])
def test_video_inputs_in_generate_are_refused_by_pre_llm_methods(qwen, with_image, token_types, call):
    model, processor, _ = qwen
    inputs = video_inputs(model, processor)
    if not token_types:  # a caller that builds inputs by hand: get_rope_index is then never asked
        inputs.pop("mm_token_type_ids")
    if with_image:
        image = encode(processor, [random_image(*SIZES[1])])
        inputs = {**image, "pixel_values_videos": inputs["pixel_values_videos"], "video_grid_thw": inputs["video_grid_thw"]}
    with td.apply(model, processor, td.RandomDrop(0.5)):
        with pytest.raises(ValueError, match="video inputs are not supported"):
            model.generate(**inputs, max_new_tokens=2) if call == "generate" else model(**inputs)
