"""PyramidDrop and FastV against a plain reference loop written here.

The reference runs one unpadded sample at a time through an EAGER copy of the language model:
it reads the score from the attention weights the layer itself returns, gathers the kept tokens,
renumbers or keeps positions, and for generation recomputes the whole sequence at every step
without a cache, reusing the keep sets chosen on the prompt.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tokendrop as td
from tokendrop.compat import output_cache
from sample_inputs import PROMPTS

STEPS = 4


def prompt_embeds(model, inputs):
    """(1, L, D) input embeddings of a single unpadded sample, built the way the stock forward does."""
    base = model.model
    embeds = base.get_input_embeddings()(inputs["input_ids"])
    sizes = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
    with torch.no_grad():
        features = base.get_image_features(inputs["pixel_values"], **sizes).pooler_output
    mask = (inputs["input_ids"] == model.config.image_token_id)[..., None]
    return embeds.masked_scatter(mask, torch.cat(features).to(embeds.dtype))


def causal(length):
    return torch.full((length, length), float("-inf")).triu(1)[None, None]


def reference_forward(lm, embeds, image, method, chosen):
    """Last-position hidden state of one sample; fills `chosen` (layer -> kept original indices) if empty."""
    depth = len(lm.layers)
    drops = dict(method.keep_counts(int(image.sum()), depth))
    renumber = method.positions in ("renumber", None)  # None: renumber on 1-D rotary models (these LLaVA ones)
    score_last = isinstance(method, td.FastV) or method.score_layer == "last"
    h, idx = embeds, torch.arange(embeds.shape[1])
    previous = None
    for i, layer in enumerate(lm.layers):
        pos = (torch.arange(len(idx)) if renumber else idx)[None]
        if i in drops:
            if i not in chosen:
                scorer, x = (lm.layers[i - 1], previous) if score_last else (layer, h)
                _, weights = scorer.self_attn(hidden_states=scorer.input_layernorm(x), attention_mask=causal(x.shape[1]),
                                              position_embeddings=lm.rotary_emb(x, pos))
                row = weights[0, :, -1].mean(dim=0)  # last prompt token, mean over heads
                image_at = image[idx].nonzero().squeeze(1)
                query = image_at[image_at == len(idx) - 1]  # the query itself is never dropped
                others = image_at[image_at != len(idx) - 1]
                top = torch.argsort(row[others], descending=True, stable=True)[: drops[i] - len(query)]
                chosen[i] = idx[torch.cat([query, others[top]])]
            keep = ~image[idx] | torch.isin(idx, chosen[i])
            h, idx = h[:, keep], idx[keep]
            pos = (torch.arange(len(idx)) if renumber else idx)[None]
        previous = h
        h = layer(h, attention_mask=causal(h.shape[1]), position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
    return lm.norm(h)[:, -1]


def reference_generate(model, lm, inputs, method, steps=STEPS):
    """Greedy tokens and the logits of every step, recomputing everything at each step without a cache."""
    with torch.no_grad():
        embeds = prompt_embeds(model, inputs)
        image = (inputs["input_ids"] == model.config.image_token_id)[0]
        chosen, tokens, logits = {}, [], []
        for _ in range(steps):
            logits.append(model.lm_head(reference_forward(lm, embeds, image, method, chosen))[0])
            tokens.append(int(logits[-1].argmax()))
            embeds = torch.cat([embeds, model.model.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
            image = torch.cat([image, torch.tensor([False])])
    return torch.tensor(tokens), torch.stack(logits)


def step_logits(out, i):
    """(steps, V) logits of sample i from generate(..., output_logits=True)."""
    return torch.stack([step[i] for step in out.logits])


@pytest.fixture(scope="module")
def eager_lm(next_model):
    lm = copy.deepcopy(next_model[0].model.language_model)
    lm.set_attn_implementation("eager")
    return lm


METHODS = [
    td.PyramidDrop(),
    td.PyramidDrop(positions="original"),
    td.PyramidDrop(layers=(2, 5), ratio=0.4, score_layer="last"),
    td.FastV(k=2, drop=0.5),
    td.FastV(k=3, drop=0.75, positions="renumber"),
]


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_cached_generate_equals_no_cache_reference_batch_1(next_model, images, eager_lm, method):
    model, processor = next_model
    inputs = processor(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    expected_tokens, expected_logits = reference_generate(model, eager_lm, inputs, method)
    with td.apply(model, processor, method) as handle:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        assert torch.equal(out.sequences[0, inputs["input_ids"].shape[1]:], expected_tokens)
        torch.testing.assert_close(step_logits(out, 0), expected_logits, atol=1e-4, rtol=1e-4)
        # every layer's cache holds what that layer saw: text + its kept image tokens + decoded tokens
        n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
        seen = method.layer_counts(n_image, len(model.model.language_model.layers))
        assert handle.layer_tokens[0].tolist() == seen
        text = inputs["input_ids"].shape[1] - n_image
        lengths = [layer.get_seq_length() for layer in output_cache(out).layers]
        assert lengths == [text + n + STEPS - 1 for n in seen]


@pytest.mark.parametrize("method", METHODS[:2] + METHODS[3:4], ids=repr)
def test_padded_batch_of_three_equals_reference_per_sample(next_model, images, eager_lm, method):
    model, processor = next_model
    batch = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    with td.apply(model, processor, method):
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
    for i in range(3):
        single = processor(images=[images[i]], text=[PROMPTS[i]], return_tensors="pt")
        tokens, logits = reference_generate(model, eager_lm, single, method)
        assert torch.equal(out.sequences[i, batch["input_ids"].shape[1]:], tokens)
        torch.testing.assert_close(step_logits(out, i), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", [td.PyramidDrop(ratio=1.0), td.FastV(drop=0.0)], ids=repr)
def test_keep_everything_is_the_stock_model(next_model, images, method):
    model, processor = next_model
    batch = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        stock = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
        with td.apply(model, processor, method):
            ours = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(ours.sequences, stock.sequences)
    for a, b in zip(ours.logits, stock.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_position_rules_differ(next_model, images):
    model, processor = next_model
    inputs = processor(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    logits = []
    for positions in ("renumber", "original"):
        with td.apply(model, processor, td.PyramidDrop(positions=positions)), torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    assert (logits[0] - logits[1]).abs().max() > 1e-5


def test_fastv_k0_is_random_and_seeded(next_model, images):
    model, processor = next_model
    inputs = processor(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    runs = []
    for seed in (0, 0, 1):
        with td.apply(model, processor, td.FastV(k=0, drop=0.5, seed=seed)) as handle, torch.no_grad():
            runs.append(model(**inputs).logits[0, -1])
            assert handle.layer_tokens[0, 0] == round(int((inputs["input_ids"] == model.config.image_token_id).sum()) * 0.5)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_sample_without_image_passes_through(next_model, images):
    model, processor = next_model
    text_only = processor.tokenizer(["Q: what is it? A:"], return_tensors="pt")
    with torch.no_grad():
        stock = model(**text_only).logits
        with td.apply(model, processor, td.PyramidDrop()) as handle:
            ours = model(**text_only).logits
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
    assert handle.layer_tokens.sum() == 0


def test_hired_then_pyramiddrop(next_model, images, eager_lm):
    model, processor = next_model
    hired, pdrop = td.HiRED(0.4), td.PyramidDrop()
    with td.apply(model, processor, hired, pdrop) as handle:
        inputs = processor(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
        n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert n_image == handle.num_tokens(images[0].size[::-1])  # HiRED's budget before the LLM
        tokens, logits = reference_generate(model, eager_lm, inputs, pdrop)  # HiRED features, reference PDrop loop
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        assert torch.equal(out.sequences[0, inputs["input_ids"].shape[1]:], tokens)
        torch.testing.assert_close(step_logits(out, 0), logits, atol=1e-4, rtol=1e-4)
        assert handle.layer_tokens[0].tolist() == pdrop.layer_counts(n_image, 8)
        assert handle.equivalent_tokens[0] == sum(pdrop.layer_counts(n_image, 8)) / 8


def check_against_reference(model, processor, inputs, method):
    lm = copy.deepcopy(model.model.language_model)
    lm.set_attn_implementation("eager")
    tokens, logits = reference_generate(model, lm, inputs, method)
    with td.apply(model, processor, method), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    assert torch.equal(out.sequences[0, inputs["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(step_logits(out, 0), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", [td.PyramidDrop(), td.FastV()], ids=repr)
def test_llava15(llava_model, images, method):
    model, processor = llava_model
    check_against_reference(model, processor, processor(images=images[:1], text=PROMPTS[:1], return_tensors="pt"), method)


@pytest.fixture(scope="module")
def onevision():
    """A tiny LLaVA-OneVision: SigLIP tower (no [CLS]) and a Qwen2 LM with GQA and qkv biases."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4),
        text_config=Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                num_attention_heads=4, num_key_value_heads=2),
        image_token_index=299, image_grid_pinpoints=pinpoints, vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56}, image_grid_pinpoints=pinpoints)
    return model, image_processor


@pytest.mark.parametrize("method", [td.PyramidDrop(), td.FastV(k=1, drop=0.75)], ids=repr)
def test_onevision_qwen2(onevision, images, method):
    model, image_processor = onevision
    pixels = image_processor(images=[images[1]], return_tensors="pt")
    with torch.no_grad():
        n_image = model.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"]).pooler_output[0].shape[0]
    ids = torch.tensor([[5, 6] + [299] * n_image + [7, 8, 9]])  # text, image, question
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels}
    check_against_reference(model, None, inputs, method)


def test_onevision_refuses_pre_llm_methods(onevision):
    model, _ = onevision
    with pytest.raises(ValueError, match=r"\[CLS\] token"):
        td.apply(model, object(), td.HiRED(0.2))


def test_batch_mixing_image_and_text_only_samples(next_model, images, eager_lm):
    model, processor = next_model
    prompts = [PROMPTS[0], "Q: just text here? A:"]
    method = td.PyramidDrop()
    with td.apply(model, processor, method) as handle, torch.no_grad():
        batch = processor(images=images[:1], text=prompts, return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
        assert handle.layer_tokens[1].sum() == 0 and handle.layer_tokens[0, -1] < handle.layer_tokens[0, 0]
        text_only = processor.tokenizer([prompts[1]], return_tensors="pt")
        alone = model.generate(**text_only, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                               output_logits=True)
    assert torch.equal(out.sequences[1, batch["input_ids"].shape[1]:], alone.sequences[0, text_only["input_ids"].shape[1]:])
    torch.testing.assert_close(step_logits(out, 1), step_logits(alone, 0), atol=1e-4, rtol=1e-4)
    single = processor(images=images[:1], text=prompts[:1], return_tensors="pt")
    _, logits = reference_generate(model, eager_lm, single, method)
    torch.testing.assert_close(step_logits(out, 0), logits, atol=1e-4, rtol=1e-4)


def test_two_images_in_one_sample_are_one_pool(next_model, images, eager_lm):
    model, processor = next_model
    inputs = processor(images=images[:2], text=["<image><image>\nQ: which is bigger? A:"], return_tensors="pt")
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    method = td.PyramidDrop()
    tokens, logits = reference_generate(model, eager_lm, inputs, method)
    with td.apply(model, processor, method) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        assert handle.layer_tokens[0].tolist() == method.layer_counts(n_image, 8)
    assert torch.equal(out.sequences[0, inputs["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(step_logits(out, 0), logits, atol=1e-4, rtol=1e-4)


# ---- edge cases of real prompts -----------------------------------------------------------------
@pytest.mark.parametrize("method", [td.FastV(k=2, drop=0.9), td.PyramidDrop(ratio=0.9),
                                    td.PyramidDrop(layers=(1, 3, 5), ratio=0.3, score_layer="last")], ids=repr)
@pytest.mark.parametrize("prompt", ["Describe: <image>", "<image>", "<image>\nQ: what? A:"])
def test_the_query_token_is_never_dropped(next_model, images, eager_lm, method, prompt):
    # A prompt that ends with its image makes the last prompt token (the query) an image token:
    # it is scored, kept at every stage, and generation continues from it.
    model, processor = next_model
    inputs = processor(images=images[:1], text=[prompt], return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    tokens, logits = reference_generate(model, eager_lm, inputs, method)
    with td.apply(model, processor, method) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        assert handle.kept_positions[0, -1] == length - 1
        n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert handle.layer_tokens[0].tolist() == method.layer_counts(n_image, 8)
    assert torch.equal(out.sequences[0, length:], tokens)
    torch.testing.assert_close(step_logits(out, 0), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", [td.PyramidDrop(ratio=1.0), td.FastV(k=2, drop=0.5)], ids=repr)
def test_static_cache_is_refused_by_name(next_model, images, method):
    model, processor = next_model
    batch = processor(images=images[:2], text=PROMPTS[:2], return_tensors="pt", padding=True)
    with td.apply(model, processor, method), pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(**batch, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_hired_works_with_a_static_cache(next_model, images):
    model, processor = next_model
    with td.apply(model, processor, td.HiRED(0.2)), torch.no_grad():
        batch = processor(images=images[:2], text=PROMPTS[:2], return_tensors="pt", padding=True)
        dynamic = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)
        static = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_hidden_states_at_keep_all_equal_the_stock_models(next_model, images):
    model, processor = next_model
    batch = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        stock = model(**batch, output_hidden_states=True).hidden_states
        with td.apply(model, processor, td.PyramidDrop(ratio=1.0)):
            ours = model(**batch, output_hidden_states=True).hidden_states
    assert len(ours) == len(stock) == 9  # embeddings + 8 layers
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [td.FastV(k=2, drop=0.5), td.PyramidDrop()], ids=repr)
def test_hidden_states_hold_the_tokens_each_layer_saw(next_model, images, method):
    model, processor = next_model
    batch = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    with td.apply(model, processor, method) as handle, torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
        counts = handle.layer_tokens
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, output_hidden_states=True,
                             return_dict_in_generate=True)
    text = (batch["input_ids"] != model.config.image_token_id).sum(dim=1)  # (B,) text and padding tokens
    assert len(states) == 9
    for i in range(8):  # input of layer i: left padded to the longest sample of that layer
        assert states[i].shape[1] == int((text + counts[:, i]).max()), i
    assert states[8].shape[1] == states[7].shape[1]
    assert len(out.hidden_states[0]) == 9 and len(out.hidden_states[1]) == 9  # prefill and one decode step
    assert all(h.shape[1] == 1 for h in out.hidden_states[1])


def test_output_attentions_is_refused_not_silent(next_model, images):
    model, processor = next_model
    batch = processor(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    with td.apply(model, processor, td.FastV()), pytest.raises(ValueError, match="output_attentions"):
        model(**batch, output_attentions=True)
