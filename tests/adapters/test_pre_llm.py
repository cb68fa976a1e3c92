"""HiRED and the controls on stock LLaVA-NeXT / LLaVA-1.5 models: counts, identity, batching, undo."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokendrop as td
from sample_inputs import PROMPTS, SIZES, random_image
from tokendrop.registry import family_for as adapter_for
from tokendrop.methods import budget_tokens


def encode(model, processor, images, prompts):
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def greedy(model, inputs, n=6):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)[:, inputs["input_ids"].shape[1]:]


def last_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def test_full_budget_with_newlines_is_the_stock_model(next_model, images):
    model, processor = next_model
    stock_inputs = encode(model, processor, images, PROMPTS)
    stock_tokens, stock_logits = greedy(model, stock_inputs), last_logits(model, stock_inputs)
    with td.apply(model, processor, td.HiRED(budget=1.0, keep_newlines=True)):
        inputs = encode(model, processor, images, PROMPTS)
        assert torch.equal(inputs["input_ids"], stock_inputs["input_ids"])
        assert torch.equal(greedy(model, inputs), stock_tokens)
        torch.testing.assert_close(last_logits(model, inputs), stock_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [td.HiRED(0.2), td.HiRED(0.3, variant="official"), td.RandomDrop(0.2), td.SpatialDrop(0.2)])
def test_batch_equals_one_by_one(next_model, images, method):
    model, processor = next_model
    with td.apply(model, processor, method) as handle:
        batch = encode(model, processor, images, PROMPTS)
        batch_tokens, batch_logits = greedy(model, batch), last_logits(model, batch)
        batch_selections = handle.selections
        for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
            single = encode(model, processor, [image], [prompt])
            assert torch.equal(greedy(model, single)[0], batch_tokens[i])
            torch.testing.assert_close(last_logits(model, single)[0], batch_logits[i], atol=1e-4, rtol=1e-4)
            assert torch.equal(handle.selections[0], batch_selections[i])


@settings(max_examples=20, deadline=None)
@given(height=st.integers(40, 400), width=st.integers(40, 400), budget=st.floats(0.01, 1.0), newlines=st.booleans())
def test_placeholders_match_features(next_model, height, width, budget, newlines):
    model, processor = next_model
    method = td.HiRED(budget, keep_newlines=newlines)
    with td.apply(model, processor, method) as handle:
        inputs = processor(images=[random_image(height, width)], text=["<image>"], return_tensors="pt")
        placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
        with torch.no_grad():
            features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        assert placeholders == features[0].shape[0] == handle.num_tokens((height, width))
        layout = adapter_for(model).layout((height, width))
        assert handle.selections[0].shape[0] == budget_tokens(budget, layout)
        valid = layout.valid()
        part, row, col = handle.selections[0].unbind(1)
        assert valid[part, row * layout.grid + col].all(), "only tokens that survive unpadding"


def test_selection_order_base_then_canvas_raster(next_model, images):
    model, processor = next_model
    with td.apply(model, processor, td.HiRED(0.3)) as handle:
        for image in images:
            inputs = encode(model, processor, [image], ["<image>"])
            with torch.no_grad():
                model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
            layout = adapter_for(model).layout((image.height, image.width))
            part, row, col = handle.selections[0].unbind(1)
            base = part == 0
            assert base[: int(base.sum())].all(), "base block first"
            flat = (row * layout.grid + col)[base]
            assert (flat[1:] > flat[:-1]).all()
            cols = layout.tiles[1]
            canvas_row = (part[~base] - 1) // cols * layout.grid + row[~base]
            canvas_col = (part[~base] - 1) % cols * layout.grid + col[~base]
            key = canvas_row * 10_000 + canvas_col
            assert (key[1:] > key[:-1]).all(), "canvas tokens in raster order of the stitched canvas"


def test_hired_picks_top_feature_layer_cls_attention_llava15(llava_model):
    # Independent check of the layer indexing: eager attention maps of the block that produces the
    # features (vision_feature_layer -2 -> block depth-2), CLS row summed over heads.
    model, processor = llava_model
    images = [random_image(120, 160, seed=s) for s in range(3)]
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    with td.apply(model, processor, td.HiRED(0.25)) as handle:
        inputs = processor(images=images, text=["<image>\nQ: hi A:"] * 3, return_tensors="pt", padding=True)
        assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 16  # floor(0.25 * 64)
        greedy(model, inputs, n=2)
        with torch.no_grad():
            attentions = eager(inputs["pixel_values"], output_attentions=True).attentions
        block = len(eager.encoder.layers) - 2
        cls = attentions[block][:, :, 0, 1:].sum(dim=1)  # (B, N)
        for i in range(3):
            expected = torch.argsort(cls[i], descending=True, stable=True)[:16].sort().values
            got = handle.selections[i][:, 1] * 8 + handle.selections[i][:, 2]
            assert torch.equal(got, expected)
        assert not torch.equal(handle.selections[0], handle.selections[1]), "each image its own selection"


@pytest.mark.parametrize("fixture", ["next_model", "llava_model"])
def test_tower_pass_reads_the_stock_towers_attention_and_features(fixture, request):
    # [CLS] rows and features ([CLS] first, as tower_pass returns them) from the path HiRED uses, against the eager tower.
    from tokendrop.families.llava.vision import score_blocks, tower_pass

    model, _ = request.getfixturevalue(fixture)
    tower = model.model.vision_tower
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    pixels = torch.randn(3, 3, tower.config.image_size, tower.config.image_size, generator=torch.Generator().manual_seed(0))
    layer = model.config.vision_feature_layer
    blocks = score_blocks(td.HiRED(0.2), len(tower.encoder.layers), layer)
    with torch.no_grad():
        _, features, rows = tower_pass(tower, pixels, layer, blocks)
        out = eager(pixels, output_attentions=True, output_hidden_states=True)
    assert blocks == {"init": ("cls", 0), "final": ("cls", len(tower.encoder.layers) - 2)}
    for name, (_, block) in blocks.items():
        torch.testing.assert_close(rows[name], out.attentions[block][:, :, 0, 1:].sum(dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features, out.hidden_states[layer], atol=1e-5, rtol=1e-5)


def test_hired_tile_budgets_follow_the_stock_towers_layer0_cls_attention(next_model):
    # Phase 1 on LLaVA-NeXT from an independent source: the eager tower's own attention maps.
    # (Under transformers 5.19 the tile budgets once came from the wrong hidden states, silently.)
    from tokendrop.methods.layout import allocate
    from tokendrop.methods.hired import region_scores

    model, processor = next_model
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    method = td.HiRED(0.3)
    for seed, (height, width) in enumerate([(224, 224), (150, 300), (330, 100), (200, 140)]):
        image = random_image(height, width, seed=seed)
        layout = adapter_for(model).layout((height, width))
        with td.apply(model, processor, method) as handle:
            inputs = encode(model, processor, [image], ["<image>"])
            with torch.no_grad():
                model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
            got = torch.bincount(handle.selections[0][:, 0], minlength=layout.num_partitions).tolist()
        with torch.no_grad():
            attentions = eager(inputs["pixel_values"][0, :1], output_attentions=True).attentions  # the base tile
        init = attentions[0][0, :, 0, 1:].sum(dim=0)  # (N,) layer-0 [CLS] row, heads summed
        total = budget_tokens(0.3, layout)
        base = min(int(0.5 * total), layout.patches)
        tiles = allocate(total - base, region_scores(init, layout).tolist(), layout.valid_counts()[1:])
        assert got == [total - sum(tiles)] + tiles, (height, width)


def test_llava15_full_budget_is_stock(llava_model):
    model, processor = llava_model
    images = [random_image(120, 160, seed=s) for s in range(2)]
    prompts = ["<image>\nQ: hi A:", "<image>\nQ: what colour? A:"]
    stock = encode(model, processor, images, prompts)
    expected = last_logits(model, stock)
    with td.apply(model, processor, td.HiRED(1.0)):
        torch.testing.assert_close(last_logits(model, encode(model, processor, images, prompts)), expected, atol=1e-5, rtol=1e-5)


def test_remove_restores_model_and_processor_bit_for_bit(next_model, images):
    model, processor = next_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model_attrs, proc_attrs = set(vars(model.model)), set(vars(processor))
    stock_inputs = encode(model, processor, images, PROMPTS)
    expected = last_logits(model, stock_inputs)
    handle = td.apply(model, processor, td.HiRED(0.2), td.PyramidDrop())
    greedy(model, encode(model, processor, images, PROMPTS), n=2)
    handle.remove()
    handle.remove()  # idempotent
    assert set(vars(model.model)) == model_attrs and set(vars(processor)) == proc_attrs
    assert "forward" not in vars(model.model.language_model)
    assert not model.model._forward_pre_hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    again = encode(model, processor, images, PROMPTS)
    assert torch.equal(again["input_ids"], stock_inputs["input_ids"])
    assert torch.equal(last_logits(model, again), expected)
