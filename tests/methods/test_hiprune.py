"""HiPrune against the official algorithm (Danielement321/HiPrune @ 6e83a12): anchors from the object
layer, their flat +-1 / +-row neighbours, registers from the feature block; on tiny LLaVA-1.5,
LLaVA-NeXT and Qwen2.5-VL."""

from __future__ import annotations

import copy

import pytest
import torch

import tokendrop as td
from sample_inputs import PROMPTS, random_image
from tokendrop.families.base import resolve
from tokendrop.loading import format_prompt
from tokendrop.methods import Layout, budget_tokens
from tokendrop.methods.hiprune import anchor_count
from tokendrop.registry import families, family_for


def encode(processor, images, prompts):
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def last_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def official_keep(found, deep, count, valid, width, alpha):
    """The official `encode_images` loop for one partition, written out: `round(T * alpha / 5)` anchors
    by the object layer's score; each anchor with i-1, i+1, i-W, i+W clamped into [0, N-1], de-duplicated;
    1 subtracted from those tokens' feature-block scores; the top rest by it. Restricted to `valid`
    tokens (tokendrop's exact budget), ties to the lower index."""
    n = len(found)
    candidates = [i for i in range(n) if valid[i]]
    anchors = sorted(candidates, key=lambda i: (-float(found[i]), i))[: round(count * alpha / 5)]
    chosen = set()
    for a in anchors:
        for j in (a, a - 1, a + 1, a - width, a + width):
            j = min(max(j, 0), n - 1)
            if valid[j]:
                chosen.add(j)
    lowered = [float(deep[i]) - (1.0 if i in chosen else 0.0) for i in range(n)]
    registers = sorted(candidates, key=lambda i: (-lowered[i], i))[: count - len(chosen)]
    return sorted(chosen | set(registers))


def kept_per_partition(selection, layout):
    part, row, col = selection.unbind(1)
    return [sorted((row[part == p] * layout.cols + col[part == p]).tolist()) for p in range(layout.num_partitions)]


# ---- worked examples on a 4x4 grid -----------------------------------------------------------------
#  0  1  2  3
#  4  5  6  7
#  8  9 10 11
# 12 13 14 15
def test_anchors_buffers_and_registers_on_a_4x4_grid():
    found = torch.zeros(1, 16)
    found[0, 5], found[0, 12] = 0.9, 0.8  # the anchors: round(12 * 1.0 / 5) = 2
    deep = torch.arange(16, dtype=torch.float32)[None] / 100  # registers: the highest indices left
    keep = td.HiPrune(0.75, alpha=1.0).select(Layout(grid=4), {"object": found, "register": deep})[0]  # B = 12
    # anchor 5: 4, 6 (+-1) and 1, 9 (+-row); anchor 12: 11 (its -1 runs over the row end, as the
    # official flat index does), 13, 8 and 16 clamped to 15; then the two best registers left: 14, 10
    assert keep.tolist() == [1, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15]


def test_a_first_row_anchor_clamps_its_upper_neighbour_to_token_0():
    found = torch.zeros(1, 16)
    found[0, 2] = 1.0  # one anchor: round(5 * 1.0 / 5) = 1; 2 - 4 clamps to 0
    deep = torch.zeros(1, 16)
    keep = td.HiPrune(5 / 16, alpha=1.0).select(Layout(grid=4), {"object": found, "register": deep})[0]
    assert keep.tolist() == [0, 1, 2, 3, 6]


def test_non_square_grid_uses_its_row_width():
    # Qwen-VL: one partition of 2 rows x 5 merged tokens; anchor 6's row neighbours are 1 and 11 -> 9 (clamped)
    found = torch.zeros(1, 10)
    found[0, 6] = 1.0
    keep = td.HiPrune(0.5, alpha=1.0).select(Layout(grid=2, grid_cols=5), {"object": found, "register": torch.zeros(1, 10)})[0]
    assert keep.tolist() == [1, 5, 6, 7, 9]


def test_anchor_count_is_the_official_rounding():
    # round(T * alpha / 5), half to even: 192 -> 4, 128 -> 3, 64 -> 1, 26 -> 1 at alpha 0.1; 25 or fewer -> none
    assert [anchor_count(t, 0.1) for t in (192, 128, 64, 26, 25, 24, 1)] == [4, 3, 1, 1, 0, 0, 0]
    assert anchor_count(125, 0.1) == 2  # 2.5 rounds to even
    assert anchor_count(8, 1.0) == 1  # round(1.6) = 2 anchors could bring 10 > 8 tokens: capped at 8 // 5


def test_default_alpha_small_budgets_have_no_anchors():
    # 64 patches, budget 0.3: T = 19, round(0.38) = 0 anchors: the feature block's top 19 tokens only
    gen = torch.Generator().manual_seed(0)
    found, deep = torch.rand(1, 64, generator=gen), torch.rand(1, 64, generator=gen)
    keep = td.HiPrune(0.3).select(Layout(grid=8), {"object": found, "register": deep})[0]
    assert keep.tolist() == torch.topk(deep[0], 19).indices.sort().values.tolist()


def test_options_are_validated_naming_the_field():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        td.HiPrune(0.2, alpha=1.5)
    with pytest.raises(ValueError, match="object_layer must be a 1-based vision layer"):
        td.HiPrune(0.2, object_layer=0)
    with pytest.raises(TypeError, match="object_layer"):
        td.HiPrune(0.2, object_layer=2.0)
    assert td.HiPrune(0.2).requires() == {"pre_llm"}, "no [CLS] needed"


def test_object_layer_is_one_based_and_absolute():
    from tokendrop.families.llava.vision import score_blocks

    # 24 blocks, features from -2 (block 22): anchors from block 8, registers from block 22
    assert score_blocks(td.HiPrune(0.2), 24, -2) == {"object": ("received", 8), "register": ("received", 22)}
    assert score_blocks(td.HiPrune(0.2, object_layer=24), 24, -2)["object"] == ("received", 23)
    # a tower shallower than the object layer: its last block
    assert score_blocks(td.HiPrune(0.2), 3, -2) == {"object": ("received", 2), "register": ("received", 1)}


# ---- the official algorithm on the stock towers -----------------------------------------------------
def eager_received(model, pixel_values, block):
    """(T, N): the official score from the eager tower's own maps, `attentions[b].mean(dim=1).mean(dim=1)[:, 1:]`."""
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        maps = eager(pixel_values, output_attentions=True).attentions
    return maps[block].mean(dim=1).mean(dim=1)[:, 1:]


def test_llava15_selection_is_the_official_algorithm(llava_model):
    model, processor = llava_model
    images = [random_image(120, 160, seed=s) for s in range(3)]
    method = td.HiPrune(0.5, alpha=0.5, object_layer=1)  # T = 32: round(3.2) = 3 anchors from block 0
    with td.apply(model, processor, method) as handle:
        inputs = encode(processor, images, ["<image>\nQ: hi A:"] * 3)
        assert [int((ids == model.config.image_token_id).sum()) for ids in inputs["input_ids"]] == [32] * 3
        last_logits(model, inputs)
        selections = handle.selections
    found = eager_received(model, inputs["pixel_values"], 0)
    deep = eager_received(model, inputs["pixel_values"], model.config.vision_feature_layer)  # the official "-2"
    for i in range(3):
        expected = official_keep(found[i], deep[i], 32, [True] * 64, 8, 0.5)
        assert kept_per_partition(selections[i], Layout(grid=8)) == [expected]


@pytest.mark.parametrize("size", [(224, 224), (150, 300), (330, 100), (150, 200)])
def test_llava_next_selection_is_the_official_algorithm_per_partition(next_model, size):
    model, processor = next_model
    image = random_image(*size, seed=4)
    layout = family_for(model).layout(size)
    method = td.HiPrune(0.4, alpha=0.5, object_layer=1)
    with td.apply(model, processor, method) as handle:
        inputs = encode(processor, [image], ["<image>"])
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        got = kept_per_partition(handle.selections[0], layout)
    pixels = inputs["pixel_values"][0, : layout.num_partitions]
    found, deep = eager_received(model, pixels, 0), eager_received(model, pixels, model.config.vision_feature_layer)
    total, parts = budget_tokens(0.4, layout), layout.num_partitions
    counts = [total // parts + (p < total % parts) for p in range(parts)]  # the official: the same T everywhere
    valid = layout.valid()
    assert all(c <= int(v) for c, v in zip(counts, valid.sum(dim=1))), "no tile is short of tokens here"
    assert got == [official_keep(found[p], deep[p], counts[p], valid[p].tolist(), layout.grid, 0.5) for p in range(parts)]


def qwen25():
    family = next(f for f in families() if f.name == "qwen2.5-vl")
    model, processor = resolve(family.tiny)()
    return model, processor


def official_qwen_scores(model, inputs, block_index):
    """Per image, the official Qwen2.5-VL score of `block_index`: the block's eager attention (per
    segment of its cu_seqlens), mean over heads, summed over queries, mean over each 2x2 group, back
    to raster order with argsort(window_index)."""
    from transformers.vision_utils import get_vision_window_index

    tower = model.model.visual
    captured = {}
    hook = tower.blocks[block_index].register_forward_pre_hook(
        lambda m, a, kw: captured.update(hidden=a[0], cu=kw["cu_seqlens"], rope=kw["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    hook.remove()
    block, grid = tower.blocks[block_index], inputs["image_grid_thw"]
    with torch.no_grad():
        x = block.norm1(captured["hidden"])
        q, k, _ = block.attn.qkv(x).reshape(x.shape[0], 3, block.attn.num_heads, -1).unbind(1)
        cos, sin = (t[:, None] for t in captured["rope"])
        half = q.shape[-1] // 2
        rot = lambda t: t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin  # noqa: E731
        q, k = rot(q).transpose(0, 1), rot(k).transpose(0, 1)  # (H, N, hd)
        bounds = captured["cu"].tolist()
        received = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            probs = (q[:, s:e] @ k[:, s:e].transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1)  # (H, n, n)
            received.append(probs.mean(dim=0).sum(dim=0))
        tokens = torch.cat(received).view(-1, 4).mean(dim=-1)
    window_index, _ = get_vision_window_index(grid, spatial_merge_size=tower.spatial_merge_size,
                                              window_size=tower.window_size, patch_size=tower.patch_size)
    tokens = tokens[torch.argsort(window_index)]
    return list(torch.split(tokens, (grid.prod(-1) // 4).tolist()))


def test_qwen2_5_vl_object_layer_is_one_based_and_must_be_full_attention():
    model, _ = qwen25()  # 4 blocks, full attention in blocks 1 and 3
    adapter = family_for(model)
    assert adapter.config_score_blocks(model.config, td.HiPrune(0.2, object_layer=2)) == {
        "object": ("received", 1), "register": ("received", 3)}
    assert adapter.config_score_blocks(model.config, td.HiPrune(0.2))["object"] == ("received", 3)  # 9: the last block
    with pytest.raises(ValueError, match="window attention"):
        adapter.config_score_blocks(model.config, td.HiPrune(0.2, object_layer=1))


def test_qwen2_5_vl_selection_is_the_official_algorithm():
    model, processor = qwen25()
    assert sorted(model.config.vision_config.fullatt_block_indexes) == [1, 3]
    sizes = [(150, 200), (100, 300)]  # non-square merged grids
    images = [random_image(*size, seed=i) for i, size in enumerate(sizes)]
    prompts = [format_prompt(processor, "what?")] * 2
    method = td.HiPrune(0.5, alpha=0.5, object_layer=2)  # anchors from block 1, registers from block 3 (both full)
    with td.apply(model, processor, method) as handle:
        inputs = encode(processor, images, prompts)
        last_logits(model, inputs)
        selections = handle.selections
    found, deep = official_qwen_scores(model, inputs, 1), official_qwen_scores(model, inputs, 3)
    for i, (_, h, w) in enumerate(inputs["image_grid_thw"].tolist()):
        layout = Layout(grid=h // 2, grid_cols=w // 2)
        assert layout.grid != layout.cols
        count = budget_tokens(0.5, layout)
        assert int((inputs["input_ids"][i] == model.config.image_token_id).sum()) == count
        assert anchor_count(count, 0.5) > 0
        expected = official_keep(found[i], deep[i], count, [True] * layout.patches, layout.cols, 0.5)
        assert kept_per_partition(selections[i], layout) == [expected]


# ---- identity and batching through the stock forward ---------------------------------------------------
@pytest.mark.parametrize("fixture", ["llava_model", "next_model"])
def test_keep_all_is_the_stock_model(fixture, request, images):
    model, processor = request.getfixturevalue(fixture)
    stock = encode(processor, images, PROMPTS)
    expected = last_logits(model, stock)
    with td.apply(model, processor, td.HiPrune(1.0, keep_newlines=True)):
        inputs = encode(processor, images, PROMPTS)
        assert torch.equal(inputs["input_ids"], stock["input_ids"])
        torch.testing.assert_close(last_logits(model, inputs), expected, atol=1e-5, rtol=1e-5)


def test_batch_equals_one_by_one_with_exact_counts(next_model, images):
    model, processor = next_model
    method = td.HiPrune(0.3, alpha=0.5, object_layer=1)
    with td.apply(model, processor, method) as handle:
        batch = encode(processor, images, PROMPTS)
        batch_logits, batch_selections = last_logits(model, batch), handle.selections
        for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
            layout = family_for(model).layout((image.height, image.width))
            assert int((batch["input_ids"][i] == model.config.image_token_id).sum()) == budget_tokens(0.3, layout)
            single = encode(processor, [image], [prompt])
            torch.testing.assert_close(last_logits(model, single)[0], batch_logits[i], atol=1e-4, rtol=1e-4)
            assert torch.equal(handle.selections[0], batch_selections[i])


def test_qwen_batch_equals_one_by_one():
    model, processor = qwen25()
    images = [random_image(150, 200), random_image(100, 300, seed=1)]
    prompts = [format_prompt(processor, "what?"), format_prompt(processor, "and this one?")]
    with td.apply(model, processor, td.HiPrune(0.4, alpha=0.5, object_layer=2)) as handle:
        batch = encode(processor, images, prompts)
        batch_logits, batch_selections = last_logits(model, batch), handle.selections
        for i in range(2):
            single = encode(processor, [images[i]], [prompts[i]])
            torch.testing.assert_close(last_logits(model, single)[0], batch_logits[i], atol=1e-4, rtol=1e-4)
            assert torch.equal(handle.selections[0], batch_selections[i])
