"""FasterVLM against the official algorithm (Theia-4869/FasterVLM @ f5d5f12): the feature block's [CLS]
row averaged over heads, each partition's top tokens, on tiny LLaVA-1.5 and LLaVA-NeXT."""

from __future__ import annotations

import copy

import pytest
import torch

import tokendrop as td
from sample_inputs import PROMPTS, random_image
from tokendrop.methods import Layout, budget_tokens
from tokendrop.registry import family_for


def encode(processor, images, prompts):
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def last_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def eager_cls_mean(model, pixel_values):
    """(T, N): the official score, from the eager tower's own maps: `attentions[-2][:, :, 0, 1:].mean(dim=1)`
    (the map of the block whose output is the feature layer, the [CLS] query's row, mean over heads)."""
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        maps = eager(pixel_values, output_attentions=True).attentions
    return maps[model.config.vision_feature_layer][:, :, 0, 1:].mean(dim=1)


def reference_keep(scores, count, valid):
    """A plain loop: the `count` valid tokens with the highest score (lower index first on ties), sorted."""
    order = sorted((i for i in range(len(scores)) if valid[i]), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:count])


def kept_per_partition(selection, layout):
    part, row, col = selection.unbind(1)
    return [sorted((row[part == p] * layout.grid + col[part == p]).tolist()) for p in range(layout.num_partitions)]


# ---- worked examples ----------------------------------------------------------------------------
def test_top_cls_tokens_in_raster_order_ties_to_the_lower_index():
    # 2x2 grid, B = floor(0.5 * 4) = 2: scores 0.1 0.4 / 0.3 0.2 keep tokens 1 and 2
    scores = {"cls": torch.tensor([[0.1, 0.4, 0.3, 0.2]])}
    assert td.FasterVLM(0.5).select(Layout(grid=2), scores)[0].tolist() == [1, 2]
    tied = {"cls": torch.tensor([[0.2, 0.5, 0.2, 0.2]])}
    assert td.FasterVLM(0.5).select(Layout(grid=2), tied)[0].tolist() == [0, 1]


def test_partitions_share_the_budget_evenly_capped_at_their_valid_tokens():
    # base + 1x2 tiles of 4x4, canvas columns 1..6 kept: 16, 12, 12 valid tokens.
    layout = Layout(grid=4, tiles=(1, 2), crop=(0, 4, 1, 7))
    assert layout.valid_counts() == [16, 12, 12]
    # B = floor(0.7 * 48) = 33: 11 each
    assert td.FasterVLM(0.7).counts(layout) == [11, 11, 11]
    # B = floor(0.8 * 48) = 38: 13, 13, 12 (remainder to the first); tile 1 holds 12, its extra token goes to the base
    assert td.FasterVLM(0.8).counts(layout) == [14, 12, 12]


def test_options_are_validated_naming_the_field():
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        td.FasterVLM(0.0)
    with pytest.raises(TypeError, match="keep_newlines"):
        td.FasterVLM(0.2, keep_newlines="yes")


def test_needs_a_cls_token():
    assert td.FasterVLM(0.2).requires() == {"pre_llm", "cls_token"}


# ---- the official algorithm on the stock towers -----------------------------------------------------
def test_llava15_keeps_the_top_tokens_of_the_head_averaged_cls_row(llava_model):
    model, processor = llava_model
    images = [random_image(120, 160, seed=s) for s in range(3)]
    with td.apply(model, processor, td.FasterVLM(0.25)) as handle:
        inputs = encode(processor, images, ["<image>\nQ: hi A:"] * 3)
        assert [int((ids == model.config.image_token_id).sum()) for ids in inputs["input_ids"]] == [16] * 3  # 0.25 * 64
        last_logits(model, inputs)
        selections = handle.selections
    scores = eager_cls_mean(model, inputs["pixel_values"])  # (3, 64)
    layout = Layout(grid=8)
    for i in range(3):
        assert kept_per_partition(selections[i], layout) == [reference_keep(scores[i], 16, [True] * 64)]
        # the official `topk` picks the same set (no ties in these scores)
        assert set(torch.topk(scores[i], k=16).indices.tolist()) == set(kept_per_partition(selections[i], layout)[0])
    assert selections[0].tolist() != selections[1].tolist(), "each image its own selection"


@pytest.mark.parametrize("size", [(224, 224), (150, 300), (330, 100), (150, 200)])
def test_llava_next_keeps_each_partitions_top_tokens(next_model, size):
    model, processor = next_model
    image = random_image(*size, seed=3)
    layout = family_for(model).layout(size)
    budget = 0.3
    with td.apply(model, processor, td.FasterVLM(budget)) as handle:
        inputs = encode(processor, [image], ["<image>"])
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        got = kept_per_partition(handle.selections[0], layout)
    scores = eager_cls_mean(model, inputs["pixel_values"][0, : layout.num_partitions])  # (P, N)
    total, parts = budget_tokens(budget, layout), layout.num_partitions
    counts = [total // parts + (p < total % parts) for p in range(parts)]  # the official: the same T everywhere
    valid = layout.valid()
    assert all(c <= int(v) for c, v in zip(counts, valid.sum(dim=1))), "no tile is short of tokens here"
    assert got == [reference_keep(scores[p], counts[p], valid[p].tolist()) for p in range(parts)]
    assert sum(map(len, got)) == total


def test_llava_next_without_padding_is_the_official_topk_per_partition(next_model):
    # A square image fills its 2x2 canvas, B = 0.25 * 5 * 64 = 80 = 5 x 16: the official keeps
    # torch.topk(mean cls, 16) in every partition, exactly what FasterVLM keeps.
    model, processor = next_model
    image = random_image(224, 224, seed=5)
    with td.apply(model, processor, td.FasterVLM(0.25)) as handle:
        inputs = encode(processor, [image], ["<image>"])
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        got = kept_per_partition(handle.selections[0], family_for(model).layout((224, 224)))
    scores = eager_cls_mean(model, inputs["pixel_values"][0])
    assert scores.shape[0] == 5
    assert got == [sorted(torch.topk(scores[p], k=16).indices.tolist()) for p in range(5)]


# ---- counts, identity and batching through generate -------------------------------------------------
@pytest.mark.parametrize("fixture", ["llava_model", "next_model"])
def test_keep_all_is_the_stock_model(fixture, request, images):
    model, processor = request.getfixturevalue(fixture)
    stock = encode(processor, images, PROMPTS)
    expected = last_logits(model, stock)
    with td.apply(model, processor, td.FasterVLM(1.0, keep_newlines=True)):
        inputs = encode(processor, images, PROMPTS)
        assert torch.equal(inputs["input_ids"], stock["input_ids"])
        torch.testing.assert_close(last_logits(model, inputs), expected, atol=1e-5, rtol=1e-5)


def test_batch_equals_one_by_one_with_exact_counts(next_model, images):
    model, processor = next_model
    method = td.FasterVLM(0.2)
    with td.apply(model, processor, method) as handle:
        batch = encode(processor, images, PROMPTS)
        batch_logits, batch_selections = last_logits(model, batch), handle.selections
        for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
            layout = family_for(model).layout((image.height, image.width))
            assert int((batch["input_ids"][i] == model.config.image_token_id).sum()) == budget_tokens(0.2, layout)
            single = encode(processor, [image], [prompt])
            torch.testing.assert_close(last_logits(model, single)[0], batch_logits[i], atol=1e-4, rtol=1e-4)
            assert torch.equal(handle.selections[0], batch_selections[i])
