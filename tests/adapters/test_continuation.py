"""Continuing a conversation with the cache of an earlier generate() under an in-LLM method.

`generate(input_ids=previous + new turn, past_key_values=out.past_key_values)` feeds the new turn
as one chunk of several tokens on top of a cache whose layers hold different numbers of entries
(the tokens each layer kept). The chunk is decoded like several tokens at once: nothing in it is
dropped, and each of its tokens attends, in every layer, to what that layer kept plus the chunk
causally. Checked against the stock model at keep-all, against the plain no-cache reference loops
of `test_in_llm` (LLaVA) and `test_qwen` (M-RoPE, DeepStack) with real drops, and batch == rows alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import test_in_llm as llava_reference
import test_qwen as qwen_reference
import tokendrop as td
from sample_inputs import PROMPTS, random_image
from tokendrop.families.base import resolve
from tokendrop.compat import output_cache
from tokendrop.loading import format_prompt

STEPS = 3
TURNS = [" and then?", " why is that so, friend?"]  # two later turns of different lengths


@pytest.fixture(scope="module", params=["llava-next", "qwen2-vl", "qwen3-vl", "qwen3.5"])
def family(request, next_model):
    """(name, model, processor, eager copy of the language model) of one tiny family."""
    from tokendrop.registry import families

    if request.param == "llava-next":
        model, processor = next_model
    else:
        model, processor = resolve(next(f for f in families() if f.name == request.param).tiny)()
    eager = copy.deepcopy(model.model.language_model)
    eager.set_attn_implementation("eager")
    return request.param, model, processor, eager


def prompt(processor, name, question="what is it?"):
    return f"<image>\nQ: {question} A:" if name == "llava-next" else format_prompt(processor, question)


def new_turn(processor, text):
    return processor.tokenizer([text], return_tensors="pt", add_special_tokens=False).input_ids


def converse(model, inputs, turns, steps=STEPS):
    """Generate `steps` tokens, then for each turn append it to the sequence and continue with the cache.

    Returns the generate() outputs of every call (the first one and one per turn)."""
    run = dict(max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        outs = [model.generate(**inputs, **run)]
        mask = inputs["attention_mask"]
        for turn in turns:
            ids = torch.cat([outs[-1].sequences, turn], dim=1)
            mask = torch.cat([mask, torch.ones(mask.shape[0], ids.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
            cache = output_cache(outs[-1])
            outs.append(model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **run))
            mask = torch.cat([mask, torch.ones(mask.shape[0], steps, dtype=mask.dtype)], dim=1)
    return outs


def logits_of(out, row=0):
    return torch.stack([step[row] for step in out.logits])


# ---- keep-all == stock ---------------------------------------------------------------------------
def runs_on(name, model, method):
    """Skip a method that ranks with a layer Qwen3.5's tiny hybrid decoder has as linear attention (refused
    there by name: test_qwen3_5); its full-attention layers are 1 and 3."""
    from tokendrop.registry import family_for

    try:
        family_for(model).check(method)
    except ValueError as error:
        assert name == "qwen3.5" and "linear_attention layer" in str(error)
        pytest.skip(f"{name}: {error}")


def skip_where_generate_miscounts(name, model, inputs, method):
    """Skip where generate() reads the conversation's length from a layer that kept fewer tokens (Qwen3.5 with
    a drop before its first full-attention layer, on releases whose hybrid cache reports that layer's length:
    5.19; the engine then refuses the resent image tokens by name, as for FastV k=0)."""
    if name != "qwen3.5":
        return
    with td.apply(model, None, method), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    held = output_cache(out).get_seq_length()
    if held < inputs["input_ids"].shape[1]:
        pytest.skip(f"transformers {transformers.__version__}: generate() counts {held} of the {inputs['input_ids'].shape[1]} "
                    "prompt tokens in this hybrid cache (its first full-attention layer's, after the drop)")


KEEP_ALL = [td.FastV(k=1, drop=0.0), td.PyramidDrop(ratio=1.0), td.FastV(k=2, drop=0.0),
            td.PyramidDrop(layers=(1, 3), ratio=1.0)]
DROPS = [td.FastV(k=1, drop=0.5), td.PyramidDrop(layers=(1, 3), ratio=0.5), td.FastV(k=2, drop=0.5)]


@pytest.mark.parametrize("method", KEEP_ALL, ids=repr)
def test_keep_all_continuation_equals_stock(family, images, method):
    name, model, processor, _ = family
    runs_on(name, model, method)
    inputs = processor(images=images[:1], text=[prompt(processor, name)], return_tensors="pt")
    turns = [new_turn(processor, text) for text in TURNS]
    stock = converse(model, inputs, turns)
    with td.apply(model, processor, method):
        ours = converse(model, inputs, turns)
    for a, b in zip(ours, stock):
        assert torch.equal(a.sequences, b.sequences)
        torch.testing.assert_close(logits_of(a), logits_of(b), atol=1e-4, rtol=1e-4)


# ---- real drops == the plain no-cache reference ------------------------------------------------------
class Reference:
    """One unpadded sample recomputed from scratch at every step, without a cache, with the keep
    sets chosen on the prompt (the reference loops of test_in_llm / test_qwen, extended by whole turns)."""

    def __init__(self, name, model, lm, inputs, method):
        self.model, self.lm, self.method, self.chosen = model, lm, method, {}
        with torch.no_grad():
            if name == "llava-next":
                self.embeds, self.positions, self.deep = llava_reference.prompt_embeds(model, inputs), None, None
                self.image = inputs["input_ids"][0] == model.config.image_token_id
            else:
                self.embeds, self.positions, self.image, self.deep = qwen_reference.stock_prompt(model, inputs)

    def logits(self) -> torch.Tensor:
        """(V,) logits of the last position of everything so far."""
        if self.positions is None:
            hidden = llava_reference.reference_forward(self.lm, self.embeds, self.image, self.method, self.chosen)
        else:
            hidden = qwen_reference.reference_forward(self.lm, self.embeds, self.positions, self.image, self.deep,
                                                      self.method, self.chosen)
        return self.model.lm_head(hidden)[0]

    def append(self, ids: torch.Tensor) -> None:
        """Append text tokens `ids` (n,): never image tokens; M-RoPE positions continue at the last + 1."""
        n = ids.shape[0]
        self.embeds = torch.cat([self.embeds, self.model.model.get_input_embeddings()(ids[None])], dim=1)
        self.image = torch.cat([self.image, torch.zeros(n, dtype=torch.bool)])
        if self.positions is not None:
            self.positions = torch.cat([self.positions, self.positions[:, :, -1:] + torch.arange(1, n + 1)], dim=2)

    def generate(self, steps=STEPS):
        """Greedy tokens (steps,) and their logits (steps, V)."""
        tokens, logits = [], []
        with torch.no_grad():
            for _ in range(steps):
                logits.append(self.logits())
                tokens.append(int(logits[-1].argmax()))
                self.append(torch.tensor([tokens[-1]]))
        return torch.tensor(tokens), torch.stack(logits)


@pytest.mark.parametrize("method", DROPS, ids=repr)
def test_continuation_equals_the_no_cache_reference(family, images, method):
    name, model, processor, eager = family
    runs_on(name, model, method)
    inputs = processor(images=images[:1], text=[prompt(processor, name)], return_tensors="pt")
    skip_where_generate_miscounts(name, model, inputs, method)
    turns = [new_turn(processor, text) for text in TURNS]
    with td.apply(model, processor, method) as handle:
        outs = converse(model, inputs, turns)
        kept = handle.layer_tokens[0]
    assert kept[-1] < kept[0]  # something was dropped
    reference = Reference(name, model, eager, inputs, method)
    for out, turn in zip(outs, [None, *turns]):
        if turn is not None:
            reference.append(turn[0])
        tokens, logits = reference.generate()
        assert torch.equal(out.sequences[0, -STEPS:], tokens)
        torch.testing.assert_close(logits_of(out), logits, atol=1e-4, rtol=1e-4)
    # every layer's cache holds the text and the image tokens it kept of the prompt, and every later token
    length = inputs["input_ids"].shape[1]
    after = outs[-1].sequences.shape[1] - 1 - length  # the last generated token is not in the cache yet
    text = length - int(reference.image[:length].sum())
    kinds = getattr(model.config.get_text_config(), "layer_types", None) or ["full_attention"] * len(kept)
    attention = [i for i, kind in enumerate(kinds) if kind != "linear_attention"]  # linear-attention caches hold no tokens
    layers = output_cache(outs[-1]).layers
    assert [layers[i].get_seq_length() for i in attention] == [text + int(kept[i]) + after for i in attention]


# ---- batch == rows alone -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", DROPS, ids=repr)
def test_left_padded_batch_of_2_equals_rows_alone(family, method):
    # prompts of different lengths (left padded) and later turns of different lengths (the shorter one
    # padded inside the sequence, at its start)
    name, model, processor, _ = family
    runs_on(name, model, method)
    images = [random_image(150, 200, seed=0), random_image(200, 140, seed=2)]
    texts = [prompt(processor, name, "what is it?"), prompt(processor, name, "what colour is the big one here?")]
    turns = processor.tokenizer(TURNS, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all() and not turns.attention_mask.all()
    skip_where_generate_miscounts(name, model, batch, method)
    with td.apply(model, processor, method):
        outs = converse_padded(model, batch, turns)
        for row in range(2):
            single = processor(images=[images[row]], text=[texts[row]], return_tensors="pt")
            alone = converse(model, single, [new_turn(processor, TURNS[row])])
            if name == "qwen3.5":  # the stock model too: a padding token INSIDE the sequence (the shorter turn's)
                outs_compared = outs[:1]  # decays a Gated-DeltaNet state (its gate does not read the mask); first call only
            else:
                outs_compared = outs
            for out, one in zip(outs_compared, alone):
                assert torch.equal(out.sequences[row, -STEPS:], one.sequences[0, -STEPS:]), row
                torch.testing.assert_close(logits_of(out, row), logits_of(one), atol=1e-4, rtol=1e-4)


def converse_padded(model, batch, turns, steps=STEPS):
    """`converse` with one left-padded later turn per row (`turns`: the tokenizer's padded output)."""
    run = dict(max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        first = model.generate(**batch, **run)
        ids = torch.cat([first.sequences, turns.input_ids], dim=1)
        generated = torch.ones(ids.shape[0], steps, dtype=batch["attention_mask"].dtype)
        mask = torch.cat([batch["attention_mask"], generated, turns.attention_mask], dim=1)
        return [first, model.generate(input_ids=ids, attention_mask=mask, past_key_values=output_cache(first), **run)]


# ---- a later turn with an image ---------------------------------------------------------------------
def test_a_later_turn_with_image_tokens_is_refused(next_model, images):
    model, processor = next_model
    inputs = processor(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    with td.apply(model, processor, td.FastV(k=1, drop=0.5)), torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
        second = processor(images=images[1:2], text=["<image>\nQ: and this one? A:"], return_tensors="pt")
        ids = torch.cat([first.sequences, second["input_ids"]], dim=1)
        with pytest.raises(ValueError, match="image tokens.*prefill"):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=second["pixel_values"],
                           image_sizes=second["image_sizes"], past_key_values=output_cache(first),
                           max_new_tokens=STEPS, do_sample=False)


# ---- a cache the last prefill did not fill ------------------------------------------------------------
def test_another_conversations_cache_is_refused_by_name(next_model, images):
    # the keep sets belong to the last prefill: continuing an older conversation's cache after another
    # prefill would use the wrong ones
    model, processor = next_model
    first = processor(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    other = processor(images=images[1:2], text=PROMPTS[1:2], return_tensors="pt")
    run = dict(max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
    with td.apply(model, processor, td.FastV(k=1, drop=0.5)), torch.no_grad():
        out = model.generate(**first, **run)
        model.generate(**other, **run)
        ids = torch.cat([out.sequences, new_turn(processor, TURNS[0])], dim=1)
        with pytest.raises(ValueError, match="last prefill"):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=output_cache(out), **run)


def test_a_drop_before_layer_0_continues_without_a_mask(next_model, images):
    # FastV(k=0) compacts layer 0's cache too: a plain forward without attention_mask still counts the
    # caller's tokens (the prefill's, not the kept ones) for its default mask and positions
    model, processor = next_model
    inputs = processor(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    with td.apply(model, processor, td.FastV(k=0, drop=0.5)), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]  # (1, STEPS)
        prefill = model(**inputs)  # selects the same tokens again (seeded)
        torch.testing.assert_close(prefill.logits[0, -1], out.logits[0][0], atol=1e-5, rtol=1e-5)
        chunk = model(input_ids=new[:, :-1], past_key_values=prefill.past_key_values).logits[0]  # STEPS - 1 at once
    torch.testing.assert_close(chunk, logits_of(out)[1:], atol=1e-4, rtol=1e-4)


def test_generate_cannot_continue_a_cache_compacted_at_layer_0(next_model, images):
    model, processor = next_model
    inputs = processor(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    with td.apply(model, processor, td.FastV(k=0, drop=0.5)), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
        ids = torch.cat([out.sequences, new_turn(processor, TURNS[0])], dim=1)
        with pytest.raises(ValueError, match="k=0.*model\\(input_ids="):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=output_cache(out),
                           max_new_tokens=STEPS, do_sample=False)
