"""Qwen3.5 (dense and MoE): pre-LLM dropping on Qwen3-VL's tower in front of the hybrid (Gated-DeltaNet +
full-attention) decoder, against the stock model.

The reference (`test_qwen.reference_pre_llm_logits`) is the STOCK model fed the kept feature rows
through `mm_encoder_outputs` and the stock M-RoPE positions of the FULL input gathered at the kept
slots: the linear-attention layers then run over the short sequence, as they do under the patch.
"""

from __future__ import annotations

import inspect
from fractions import Fraction

import pytest
import torch

import test_qwen as qwen_reference
import tokendrop as td
from sample_inputs import random_image
from tokendrop.families.qwen_vl.common import QwenGeometry
from tokendrop.families.qwen_vl.qwen3_5 import Qwen3_5Adapter
from tokendrop.registry import family_for

SIZES = [(150, 200), (100, 300), (200, 140)]
PRE_LLM = [td.RandomDrop(0.3, seed=1), td.SpatialDrop(0.5), td.DominantDrop(0.3)]
encode, step_logits = qwen_reference.encode, qwen_reference.step_logits


def build(moe: bool):
    from tokendrop.families.qwen_vl.tiny import tiny_qwen3_5

    model, processor = tiny_qwen3_5(moe=moe)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="module")
def qwen35():
    """The dense model (the MoE one shares every seam: the tests that touch the decoder run on both)."""
    return build(moe=False)


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def both(request, qwen35):
    return qwen35 if not request.param else build(moe=True)


def image_slots(model, inputs, row=0) -> int:
    return int((inputs["input_ids"][row] == model.config.image_token_id).sum())


def test_the_tiny_model_is_hybrid_and_the_hybrid_hook_runs_it(both):
    model, _ = both
    adapter = family_for(model)
    kinds = model.config.text_config.layer_types
    assert isinstance(adapter, Qwen3_5Adapter) and type(model).__name__ in type(adapter).model_classes
    assert {"linear_attention", "full_attention"} == set(kinds)
    assert all(hasattr(layer, "linear_attn") == (kind == "linear_attention")
               for layer, kind in zip(adapter.language_model.layers, kinds))
    assert adapter.capabilities() == {"pre_llm", "in_llm", "features"}  # no [CLS], no base image, M-RoPE
    assert type(adapter.decoder_hook()).__name__ == "HybridDecoder"


@pytest.mark.parametrize("method", PRE_LLM, ids=repr)
def test_placeholder_counts_are_known_before_encoding(qwen35, method):
    model, processor = qwen35
    images = [random_image(*size, seed=i) for i, size in enumerate(SIZES)]
    stock = encode(processor, images, ["a?"] * 3)
    with td.apply(model, processor, method) as handle, torch.no_grad():
        short = encode(processor, images, ["a?"] * 3)
        model(**short)
        for i, image in enumerate(images):
            t, h, w = stock["image_grid_thw"][i].tolist()
            grid = (h // 2) * (w // 2)  # merged tokens of the stock grid: the stock placeholder count
            assert image_slots(model, stock, i) == grid
            n = image_slots(model, short, i)
            assert n == handle.num_tokens((image.height, image.width)) == int(Fraction(repr(method.budget)) * grid)  # floor
            assert handle.selections[i].shape[0] == n


@pytest.mark.parametrize("method", PRE_LLM, ids=repr)
def test_pre_llm_logits_equal_the_stock_model_fed_the_kept_rows_at_their_original_positions(both, method):
    model, processor = both
    image = random_image(*SIZES[1])
    full = encode(processor, [image])
    with td.apply(model, processor, method) as handle:
        short = encode(processor, [image])
        with torch.no_grad():  # generate first: its positions are computed before the encoder has chosen
            out = model.generate(**short, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
            deltas = model.model.rope_deltas.clone()
            ours = model(**short).logits[0, -1]
        kept = handle.selections[0]
    assert kept.shape[0] == image_slots(model, short) < image_slots(model, full)
    layout = family_for(model).processor_geometry(processor).input_layout(full, 0)[0]
    flat = kept[:, 1] * layout.cols + kept[:, 2]
    expected, positions = qwen_reference.reference_pre_llm_logits(model, full, [flat], short)  # the stock model
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits[0][0], expected, atol=1e-4, rtol=1e-4)
    assert int(deltas[0]) == int(positions.max()) + 1 - positions.shape[-1]  # decoding continues at the original max + 1
    first = out.sequences[:, -2:-1]  # the second step: the first token at the last position + 1
    longer = {"input_ids": torch.cat([short["input_ids"], first], dim=1),
              "attention_mask": torch.cat([short["attention_mask"], torch.ones_like(first)], dim=1)}
    second, _ = qwen_reference.reference_pre_llm_logits(model, full, [flat], longer, extra=1)
    torch.testing.assert_close(out.logits[1][0], second, atol=1e-4, rtol=1e-4)


def test_dominant_drop_keeps_the_tokens_that_receive_the_most_attention_in_the_last_block(qwen35):
    from tokendrop.scoring import received_attention_qwen

    model, processor = qwen35
    images = [random_image(*size, seed=i) for i, size in enumerate(SIZES[:2])]
    full = encode(processor, images, ["a?", "b?"])
    block, captured = model.model.visual.blocks[-1], {}  # the default scoring block: the last one
    hook = block.register_forward_pre_hook(
        lambda m, a, kw: captured.update(hidden=a[0], cu=kw["cu_seqlens"], rope=kw["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        model.model.visual(full["pixel_values"], grid_thw=full["image_grid_thw"])
        hook.remove()
        per_patch = received_attention_qwen(block, captured["hidden"], captured["cu"], captured["rope"])
    tokens = per_patch.view(-1, 4).sum(dim=1)  # one score per 2x2 merge group, raster order (no window blocks)
    sizes = (full["image_grid_thw"].prod(-1) // 4).tolist()
    with td.apply(model, processor, td.DominantDrop(0.3)) as handle, torch.no_grad():
        model(**encode(processor, images, ["a?", "b?"]))
        for i, scores in enumerate(torch.split(tokens, sizes)):
            cols = int(full["image_grid_thw"][i, 2]) // 2
            kept = handle.selections[i][:, 1] * cols + handle.selections[i][:, 2]
            top = torch.argsort(scores, descending=True, stable=True)[: kept.numel()].sort().values
            assert torch.equal(kept, top), i


def test_kept_positions_are_a_subset_of_the_stock_ones_in_order(qwen35):
    # The M-RoPE rows the patched get_rope_index gives the short prompt are the stock rows of the full
    # prompt at the kept slots: nothing renumbered, the text after the image unchanged.
    model, processor = qwen35
    image = random_image(*SIZES[0])
    full = encode(processor, [image])
    base = model.model
    stock, _ = type(base).get_rope_index(base, full["input_ids"], mm_token_type_ids=full["mm_token_type_ids"],
                                         image_grid_thw=full["image_grid_thw"])
    with td.apply(model, processor, td.SpatialDrop(0.25)) as handle, torch.no_grad():
        short = encode(processor, [image])
        model(**short)
        ours, _ = base.get_rope_index(short["input_ids"], mm_token_type_ids=short["mm_token_type_ids"],
                                      image_grid_thw=short["image_grid_thw"])
        kept = handle.selections[0]
    image = full["input_ids"][0] == model.config.image_token_id
    cols = int(full["image_grid_thw"][0, 2]) // 2
    keep = ~image
    keep[image.nonzero()[0, 0] + kept[:, 1] * cols + kept[:, 2]] = True
    assert torch.equal(ours, stock[:, :, keep])
    assert torch.equal(ours[:, 0, -5:], stock[:, 0, -5:])  # the text after the image keeps its positions


def test_keep_all_is_the_stock_model_token_for_token(qwen35):
    model, processor = qwen35
    images = [random_image(*size, seed=i) for i, size in enumerate(SIZES)]
    questions = ["what?", "how many squares are there?", "colour?"]
    batch = encode(processor, images, questions)
    with torch.no_grad():
        stock = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    for method in (td.RandomDrop(1.0), td.SpatialDrop(1.0), td.DominantDrop(1.0)):
        with td.apply(model, processor, method), torch.no_grad():
            again = encode(processor, images, questions)
            assert torch.equal(again["input_ids"], batch["input_ids"])
            ours = model.generate(**again, max_new_tokens=3, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        assert torch.equal(ours.sequences, stock.sequences), method
        for a, b in zip(ours.logits, stock.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", PRE_LLM, ids=repr)
def test_padded_batch_with_a_text_only_row_equals_one_by_one(both, method):
    # left padding, two image sizes, and a middle row without an image
    model, processor = both
    images = [random_image(*SIZES[0], seed=0), random_image(*SIZES[2], seed=2)]
    questions = ["<|vision_start|><|image_pad|><|vision_end|>what is it?", "just text, no image here, a longer row?",
                 "<|vision_start|><|image_pad|><|vision_end|>how many?"]
    singles = [([images[0]], questions[0]), ([], questions[1]), ([images[1]], questions[2])]
    with td.apply(model, processor, method), torch.no_grad():
        batch = processor(images=images, text=questions, return_tensors="pt", padding=True)
        assert bool((batch["attention_mask"] == 0).any())  # the rows are padded
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        for i, (image, question) in enumerate(singles):
            one = processor(images=image or None, text=[question], return_tensors="pt")
            alone = model.generate(**one, max_new_tokens=3, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
            assert torch.equal(out.sequences[i, batch["input_ids"].shape[1]:], alone.sequences[0, one["input_ids"].shape[1]:])
            torch.testing.assert_close(step_logits(out, i), step_logits(alone, 0), atol=1e-4, rtol=1e-4)


def test_the_replacement_get_image_features_keeps_the_stock_signature(qwen35):
    # generate() pre-encodes images with the arguments it finds in get_image_features' signature
    model, processor = qwen35
    shape = lambda f: [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]  # noqa: E731
    stock = shape(model.model.get_image_features)
    assert {"pixel_values", "image_grid_thw"} <= {name for name, _, _ in stock}
    with td.apply(model, processor, td.DominantDrop(0.3)):
        assert "get_image_features" in vars(model.model)  # the instance's, not the class's
        assert shape(model.model.get_image_features) == stock


def test_remove_restores_model_and_processor_bit_for_bit(both):
    model, processor = both
    images = [random_image(*size, seed=i) for i, size in enumerate(SIZES)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model_attrs, proc_attrs = set(vars(model.model)), set(vars(processor))
    stock_inputs = encode(processor, images, ["a?", "b?", "c?"])
    with torch.no_grad():
        expected = model(**stock_inputs).logits
    handle = td.apply(model, processor, td.DominantDrop(0.3))
    with torch.no_grad():
        model.generate(**encode(processor, images, ["a?", "b?", "c?"]), max_new_tokens=2, do_sample=False)
    handle.remove()
    handle.remove()  # idempotent
    assert set(vars(model.model)) == model_attrs and set(vars(processor)) == proc_attrs
    assert not model.model._forward_pre_hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    again = encode(processor, images, ["a?", "b?", "c?"])
    assert torch.equal(again["input_ids"], stock_inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**again).logits, expected)


# ---- in-LLM on the hybrid decoder (tiny: full attention at layers 1 and 3) --------------------------------
# continuing a conversation with its cache, keep-all == stock and real drops == the no-cache reference,
# and padded batches == rows alone: tests/adapters/test_continuation.py (its families include qwen3.5)
IN_LLM = [td.FastV(k=2, drop=0.5), td.PyramidDrop(layers=(1, 3), ratio=0.5), td.FastV(k=2, drop=0.75)]


@pytest.fixture(scope="module")
def eager35(both):
    import copy

    model, processor = both
    eager = copy.deepcopy(model.model.language_model)
    eager.set_attn_implementation("eager")
    return model, processor, eager


@pytest.mark.parametrize("method", IN_LLM, ids=repr)
def test_in_llm_equals_the_plain_reference_loop(eager35, method):
    """Every decode step's logits equal a no-cache loop that slices the dropped tokens out of every later
    layer, linear-attention layers included (test_qwen.reference_generate)."""
    model, processor, eager = eager35
    inputs = encode(processor, [random_image(*SIZES[0])])
    tokens, logits = qwen_reference.reference_generate(model, eager, inputs, method)
    with td.apply(model, processor, method) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=qwen_reference.STEPS, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        n = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert handle.layer_tokens[0].tolist() == method.layer_counts(n, len(eager.layers))
    assert torch.equal(out.sequences[0, inputs["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(step_logits(out, 0), logits, atol=1e-4, rtol=1e-4)


def test_in_llm_padded_batch_equals_the_reference_per_sample(eager35):
    # mixed image sizes, a text-only row: after the drop the rows are left-padded again, and the
    # linear-attention layers take the 2-D padding mask of the short sequence
    model, processor, eager = eager35
    method = IN_LLM[0]
    images = [random_image(*SIZES[0], seed=0), random_image(*SIZES[2], seed=2)]
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    questions = [pad + "what is it?", "just text, no image here?", pad + "how many?"]
    batch = processor(images=images, text=questions, return_tensors="pt", padding=True)
    with td.apply(model, processor, method), torch.no_grad():
        out = model.generate(**batch, max_new_tokens=qwen_reference.STEPS, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    for i, (image, question) in enumerate([([images[0]], questions[0]), ([], questions[1]), ([images[1]], questions[2])]):
        single = processor(images=image or None, text=[question], return_tensors="pt")
        tokens, logits = qwen_reference.reference_generate(model, eager, single, method)
        assert torch.equal(out.sequences[i, batch["input_ids"].shape[1]:], tokens), i
        torch.testing.assert_close(step_logits(out, i), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method, layer, move", [(td.FastV(k=1, drop=0.5), 0, "drop before layer 2"),
                                                 (td.PyramidDrop(), 2, "drop before layer 1, before layer 3"),
                                                 (td.FastV(k=3, drop=0.5), 2, "drop before layer 2$")])
def test_a_linear_attention_ranking_layer_is_refused_naming_the_nearest_full_attention_layers(both, method, layer, move):
    model, processor = both
    message = rf"ranks .* with layer {layer}, a linear_attention layer .* full-attention layers are .*: {move}"
    with pytest.raises(ValueError, match=message):
        td.apply(model, processor, method)
    with pytest.raises(ValueError, match=message):  # from the config alone: what the CLI checks before loading
        type(family_for(model)).config_check(model.config, method)
    with pytest.raises(ValueError, match=message):  # with a pre-LLM method in front of it: nothing patched
        td.apply(model, processor, td.SpatialDrop(0.5), method)
    assert "get_image_features" not in vars(model.model) and "replace_image_token" not in vars(processor)


def test_methods_that_need_what_qwen3_5_lacks_are_refused_by_name(qwen35):
    model, processor = qwen35
    with pytest.raises(ValueError, match=r"\[CLS\] token \(capability 'cls_token'\)"):
        td.apply(model, processor, td.HiRED(0.2))
    with pytest.raises(ValueError, match="capability 'base_image'"):
        td.apply(model, processor, td.BaseOnly())


def test_geometry_is_qwen3_vls_at_the_processors_limits(qwen35):
    model, processor = qwen35
    adapter = family_for(model)
    assert adapter.geometry == QwenGeometry(16, 2, *adapter.default_pixels)
    for size in [(150, 200), (1000, 90), (33, 33)]:
        ids = encode(processor, [random_image(*size)])
        assert image_slots(model, ids) == adapter.stock_tokens(size, processor)


def test_the_moe_decoder_returns_its_output_class_and_refuses_router_logits():
    model, processor = build(moe=True)
    inputs = encode(processor, [random_image(*SIZES[0])])
    with td.apply(model, processor, td.FastV(k=2, drop=0.5)), torch.no_grad():
        out = model.model.language_model(input_ids=inputs["input_ids"][:, -3:])
        assert type(out).__name__ == "MoeModelOutputWithPast" and out.router_logits is None  # what the outer model reads
        with pytest.raises(ValueError, match="output_router_logits=True is not available under in-LLM methods"):
            model(**inputs, output_router_logits=True)
