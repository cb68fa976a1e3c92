"""VisionZip against the official algorithm (dvlab-research/VisionZip @ 3151f6d, `clip_encoder.py` forward):
a worked example by hand, then the tokens and merged rows of tiny LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL
against a reference written from the official code on the eager towers' own maps, keys and states."""

from __future__ import annotations

import copy

import pytest
import torch

import tokendrop as td
from sample_inputs import random_image
from tokendrop.loading import format_prompt
from tokendrop.methods import Layout, budget_tokens
from tokendrop.registry import family_for


# ---- the official algorithm, written as its code is (one-hot assignment, batched matmuls) -------------
def reference_partition(score, keys, hidden, valid, count, contextual, cls):
    """One partition as the official forward: (fed rows (count, Dv), dominant patch indices, target indices).

    Args:
        score: (N,) dominant score; keys: (N, hd) keys averaged over heads; hidden: (N + cls, Dv) the
            feature layer ([CLS] first when `cls`); valid: (N,) bool; count: the partition's tokens.
    """
    C = int(count * contextual)
    patches = count - C - int(cls)  # the official topk(dominant_num) plus [CLS]
    order = torch.argsort(score.masked_fill(~valid, float("-inf")), descending=True, stable=True)[:patches]
    dominant = order.sort().values
    rest = valid.clone()
    rest[dominant] = False
    metric = keys[rest]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    states = hidden[int(cls):][rest]
    dominant_rows = torch.cat([hidden[:1], hidden[1:][dominant]]) if cls else hidden[dominant]
    if C == 0:  # the official divides by zero here (R // 0): no contextual token
        return dominant_rows, dominant, dominant[:0]
    R = metric.shape[0]
    step = max(1, R // C)
    targets = torch.arange(0, R, step)[:C]
    to_merge = ~torch.isin(torch.arange(R), targets)
    similarity = torch.bmm(metric[to_merge][None], metric[targets][None].transpose(1, 2))  # (1, R - C, C)
    one_hot = torch.zeros(1, int(to_merge.sum()), C).scatter_(2, similarity.argmax(dim=2, keepdim=True), 1)
    counts = one_hot.sum(dim=1).clamp(min=1)[..., None]  # (1, C, 1)
    aggregated = torch.bmm(one_hot.transpose(1, 2), states[to_merge][None]) / counts
    contextual_rows = states[targets] + aggregated[0]
    return torch.cat([dominant_rows, contextual_rows]), dominant, rest.nonzero().squeeze(1)[targets]


# ---- by hand --------------------------------------------------------------------------------------
KEYS = torch.tensor([[1.0, 0.0], [0.1, 1.0], [5.0, 5.0], [0.0, 1.0], [1.0, 0.2], [1.0, 1.0]])
FEATURES = torch.tensor([[10.0], [20.0], [30.0], [40.0], [50.0], [60.0]])
DOMINANT = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.1, 0.2])


@pytest.mark.parametrize("cls", [False, True])
def test_six_tokens_two_targets_by_hand(cls):
    # 6 patches; without [CLS] T = floor(0.5 * 6) = 3 tokens, C = floor(3 * 0.7) = 2 contextual, 1 dominant:
    # token 2 (highest score). With [CLS] T = floor(0.67 * 6) = 4: [CLS] + token 2 + 2 contextual.
    # The remaining tokens 0, 1, 3, 4, 5 (R = 5), step = 5 // 2 = 2: targets at 0 and 2 of them, tokens 0 and 3.
    # Keys: token 1 is nearest token 3, token 4 nearest token 0, token 5 equally near both (first: token 0).
    # Contextual rows: 10 + (50 + 60) / 2 = 65 and 40 + 20 = 60.
    method = td.VisionZip(0.67 if cls else 0.5, contextual=0.7)
    scores = {"dominant": DOMINANT[None], "keys": KEYS[None], "features": FEATURES[None]}
    (merged,) = method.merge(Layout(grid=1, grid_cols=6), scores, cls=cls)
    assert merged.cls is cls and merged.keep.tolist() == [2] and merged.anchors.tolist() == [0, 3]
    assert merged.rows.flatten().tolist() == [65.0, 60.0]
    assert merged.num_tokens == method.num_tokens(Layout(grid=1, grid_cols=6))


def test_a_target_with_no_member_is_itself_and_full_budget_is_stock():
    # 4 patches, T = floor(0.75 * 4) = 3, C = floor(3 * 0.67) = 2, 1 dominant (token 1); the remaining tokens
    # 0, 2, 3 (R = 3), step = max(1, 3 // 2) = 1: targets tokens 0 and 2. Token 3's key is orthogonal to both
    # (a tie): it joins the first target. Rows: 10 + 40 = 50, and token 2 alone: 30.
    method = td.VisionZip(0.75, contextual=0.67)
    scores = {"dominant": torch.tensor([[0.0, 1.0, 0.0, 0.0]]), "keys": torch.eye(4)[None], "features": FEATURES[None, :4]}
    (merged,) = method.merge(Layout(grid=2), scores, cls=False)
    assert merged.keep.tolist() == [1] and merged.anchors.tolist() == [0, 2]
    assert merged.rows.flatten().tolist() == [50.0, 30.0]
    (full,) = td.VisionZip(1.0).merge(Layout(grid=2), scores, cls=True)
    assert not full.cls and full.keep.tolist() == [0, 1, 2, 3] and full.rows.numel() == 0


def test_options_are_validated_naming_the_field():
    with pytest.raises(ValueError, match=r"contextual must be in \[0, 1\)"):
        td.VisionZip(0.2, contextual=1.0)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        td.VisionZip(0.0)
    assert td.VisionZip(0.2).requires() == {"pre_llm", "features", "merge"}  # [CLS]-free towers run it too


@pytest.mark.parametrize("layout", [Layout(grid=8), Layout(grid=6, tiles=(3, 1), crop=(0, 18, 1, 5))], ids=str)
@pytest.mark.parametrize("budget", [0.02, 0.1, 0.3, 0.77])
@pytest.mark.parametrize("cls", [False, True])
def test_exact_counts_and_the_reference_on_random_inputs(layout, budget, cls):
    gen = torch.Generator().manual_seed(int(budget * 100))
    P, N = layout.num_partitions, layout.patches
    score, keys = torch.rand(P, N, generator=gen), torch.randn(P, N, 4, generator=gen)
    hidden = torch.randn(P, N + 1, 6, generator=gen)
    method = td.VisionZip(budget)
    merged = method.merge(layout, {"dominant": score, "keys": keys, "features": hidden[:, 1:]}, cls=cls)
    assert sum(m.num_tokens for m in merged) == method.num_tokens(layout) == budget_tokens(budget, layout)
    valid = layout.valid()
    for p, (m, count) in enumerate(zip(merged, method.counts(layout))):
        feed = cls and count > int(count * 0.15625)  # a partition with no token feeds no [CLS] either
        rows, dominant, targets = reference_partition(score[p], keys[p], hidden[p] if feed else hidden[p, 1:], valid[p],
                                                      count, 0.15625, feed)
        assert m.cls is feed
        assert torch.equal(m.keep, dominant) and torch.equal(m.anchors, targets)
        torch.testing.assert_close(m.rows, rows[rows.shape[0] - m.rows.shape[0]:], atol=1e-6, rtol=1e-6)


# ---- tiny LLaVA-1.5 / LLaVA-NeXT ------------------------------------------------------------------------
def eager_inputs(model, pixels, cls=True):
    """Official inputs of the feature block from an eager copy of the tower: ([CLS] row summed over heads (T, N),
    or without [CLS] the attention received, mean over heads and queries; keys averaged over heads (T, N, hd) as
    its k_proj returns them; the feature layer (T, N + cls, Dv))."""
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    layer = model.config.vision_feature_layer
    block = layer % (len(eager.encoder.layers) + 1) - 1
    seen = {}
    attn = eager.encoder.layers[block].self_attn
    hook = attn.k_proj.register_forward_hook(lambda m, a, out: seen.update(keys=out))
    with torch.no_grad():
        out = eager(pixels, output_attentions=True, output_hidden_states=True)
    hook.remove()
    T, L, _ = seen["keys"].shape
    keys = seen["keys"].view(T, L, attn.num_heads, attn.head_dim).mean(dim=2)[:, int(cls):]
    maps = out.attentions[block]  # (T, H, L, L)
    score = maps[:, :, 0, 1:].sum(dim=1) if cls else maps.mean(dim=(1, 2))
    return score, keys, out.hidden_states[layer]


def image_pixels(pixel_values, i, layout):
    return pixel_values[i][: layout.num_partitions] if pixel_values.dim() == 5 else pixel_values[i : i + 1]


def reference_rows(model, layout, pixels, budget, has_cls=True):
    """(fed rows before the projector in the adapter's order, selection rows) from the official algorithm."""
    score, keys, hidden = eager_inputs(model, pixels, has_cls)
    valid, g, first = layout.valid(), layout.grid, int(has_cls)
    counts = td.VisionZip(budget).counts(layout)
    assert sum(counts) == budget_tokens(budget, layout)
    feeds_cls = [has_cls and n > int(n * 0.15625) for n in counts]  # a partition with no token feeds no [CLS]
    parts = [reference_partition(score[p], keys[p], hidden[p] if feed else hidden[p, first:], valid[p], n, 0.15625, feed)
             for p, (n, feed) in enumerate(zip(counts, feeds_cls))]
    if not layout.num_tiles:
        rows, dominant, targets = parts[0]
        where = [(0, -1, -1)] * feeds_cls[0] + [(0, int(i) // g, int(i) % g) for i in torch.cat([dominant, targets])]
        return rows, where
    # LLaVA-NeXT: base [CLS] + dominant + contextual; tiles' dominant in canvas raster order; tiles' [CLS]; tiles' contextual
    rows, dominant, targets = parts[0]
    out = [rows]
    where = [(0, -1, -1)] * feeds_cls[0] + [(0, int(i) // g, int(i) % g) for i in torch.cat([dominant, targets])]
    cols = layout.tiles[1]
    canvas = sorted(((p - 1) // cols * g + int(i) // g, (p - 1) % cols * g + int(i) % g, p, int(i))
                    for p in range(1, layout.num_partitions) for i in parts[p][1])
    out.append(torch.stack([hidden[p, first + i] for _, _, p, i in canvas]) if canvas else hidden[0, :0])
    where += [(p, i // g, i % g) for _, _, p, i in canvas]
    out += [hidden[p, :1] for p in range(1, layout.num_partitions) if feeds_cls[p]]
    where += [(p, -1, -1) for p in range(1, layout.num_partitions) if feeds_cls[p]]
    for p in range(1, layout.num_partitions):
        contextual = parts[p][0][parts[p][0].shape[0] - parts[p][2].numel():]
        out.append(contextual)
        where += [(p, int(i) // g, int(i) % g) for i in parts[p][2]]
    return torch.cat(out), where


@pytest.mark.parametrize("fixture", ["llava_model", "next_model"])
@pytest.mark.parametrize("budget", [0.1, 0.3])
def test_llava_feeds_the_official_tokens_and_logits(fixture, budget, request):
    model, processor = request.getfixturevalue(fixture)
    adapter = family_for(model)
    images = [random_image(150, 300, seed=1), random_image(224, 224, seed=2)]
    prompts = ["<image>\nQ: what is it? A:", "<image>\nQ: how many? A:"]
    with td.apply(model, processor, td.VisionZip(budget)) as handle, torch.no_grad():
        short = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        logits = model(**short).logits[:, -1]
        selections = handle.selections
    embeds = model.get_input_embeddings()(short["input_ids"])
    for i, image in enumerate(images):
        layout = adapter.layout((image.height, image.width))
        rows, where = reference_rows(model, layout, image_pixels(short["pixel_values"], i, layout), budget)
        assert selections[i].tolist() == [list(w) for w in where], i
        slots = short["input_ids"][i] == model.config.image_token_id
        assert int(slots.sum()) == rows.shape[0] == adapter.num_tokens(td.VisionZip(budget), (image.height, image.width))
        with torch.no_grad():
            embeds[i, slots] = model.model.multi_modal_projector(rows)
    with torch.no_grad():
        expected = model(inputs_embeds=embeds, attention_mask=short["attention_mask"]).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_onevision_without_cls_feeds_the_official_tokens_by_received_attention():
    from tokendrop.families.llava.tiny import tiny_llava_onevision

    model, processor = tiny_llava_onevision()
    adapter = family_for(model)
    image = random_image(150, 300, seed=1)
    text = [format_prompt(processor, "what is it?")]
    with td.apply(model, processor, td.VisionZip(0.3)) as handle, torch.no_grad():
        short = processor(images=[image], text=text, return_tensors="pt")
        logits = model(**short).logits[:, -1]
        selection = handle.selections[0]
    layout = adapter.layout((image.height, image.width))
    rows, where = reference_rows(model, layout, image_pixels(short["pixel_values"], 0, layout), 0.3, has_cls=False)
    assert selection.tolist() == [list(w) for w in where]
    embeds = model.get_input_embeddings()(short["input_ids"])
    slots = short["input_ids"][0] == model.config.image_token_id
    with torch.no_grad():
        embeds[0, slots] = model.model.multi_modal_projector(rows)
        expected = model(inputs_embeds=embeds, attention_mask=short["attention_mask"]).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_llava_next_batch_equals_one_by_one(next_model):
    model, processor = next_model
    images = [random_image(150, 300, seed=3), random_image(330, 100, seed=4)]
    prompts = ["<image>\nQ: what is it? A:", "<image>\nQ: which colour is it? A:"]
    with td.apply(model, processor, td.VisionZip(0.2, keep_newlines=True)) as handle, torch.no_grad():
        batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        together, chosen = model(**batch).logits[:, -1], handle.selections
        for i in range(2):
            single = processor(images=[images[i]], text=[prompts[i]], return_tensors="pt")
            torch.testing.assert_close(model(**single).logits[0, -1], together[i], atol=1e-4, rtol=1e-4)
            assert torch.equal(handle.selections[0], chosen[i])


@pytest.mark.parametrize("fixture", ["llava_model", "next_model"])
def test_full_budget_equals_the_stock_model(fixture, request):
    model, processor = request.getfixturevalue(fixture)
    images = [random_image(150, 300, seed=5)]
    prompts = ["<image>\nQ: what is it? A:"]
    with torch.no_grad():
        stock = model(**processor(images=images, text=prompts, return_tensors="pt")).logits[:, -1]
        with td.apply(model, processor, td.VisionZip(1.0, keep_newlines=True)):
            full = model(**processor(images=images, text=prompts, return_tensors="pt")).logits[:, -1]
    torch.testing.assert_close(full, stock, atol=1e-5, rtol=1e-5)


# ---- tiny Qwen2.5-VL: no [CLS] ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen25():
    from tokendrop.families.qwen_vl.tiny import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl()


def qwen_inputs(model, inputs):
    """(received (N,), keys (N, 4 hd), merger input (N, 4 Dv)) in raster order, from the stock tower's own
    blocks: the last block (full attention) recomputed with a plain N x N softmax per image."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    tower, seen = model.model.visual, {}
    block = tower.blocks[-1]

    def at_block(module, args, kwargs):
        seen.update(hidden=args[0] if args else kwargs["hidden_states"], cu=kwargs["cu_seqlens"],
                    rotary=kwargs["position_embeddings"])

    hooks = [block.register_forward_pre_hook(at_block, with_kwargs=True),
             tower.merger.register_forward_pre_hook(lambda m, args: seen.update(merger=args[0]))]
    with torch.no_grad():
        type(model.model).get_image_features(model.model, inputs["pixel_values"], inputs["image_grid_thw"])
        for hook in hooks:
            hook.remove()
        x = block.norm1(seen["hidden"])
        N = x.shape[0]
        q, k, _ = block.attn.qkv(x).reshape(N, 3, block.attn.num_heads, -1).unbind(1)  # (N, H, hd)
        cos, sin = seen["rotary"]
        q_rot, k_rot = apply_rotary_pos_emb_vision(q, k, cos, sin)
        received = torch.zeros(N)
        bounds = seen["cu"].tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            maps = (torch.einsum("qhd,khd->hqk", q_rot[a:b].float(), k_rot[a:b].float()) * block.attn.scaling).softmax(-1)
            received[a:b] = maps.mean(dim=(0, 1))
    window, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=tower.spatial_merge_size,
                                        window_size=tower.window_size, patch_size=tower.patch_size)
    raster = torch.argsort(window)
    group = lambda t: t.reshape(-1, 4 * t.shape[-1])[raster]  # noqa: E731
    return (received.view(-1, 4).sum(dim=1)[raster], group(k.float().mean(dim=1)), group(seen["merger"].float()))


def test_qwen_feeds_the_official_tokens_at_their_targets_positions(qwen25):
    model, processor = qwen25
    image = random_image(150, 200, seed=1)
    text = [format_prompt(processor, "what is it?")]
    budget = 0.4
    full = processor(images=[image], text=text, return_tensors="pt")
    grid = full["image_grid_thw"][0].tolist()
    layout = Layout(grid=grid[1] // 2, grid_cols=grid[2] // 2)
    received, keys, merger_in = qwen_inputs(model, full)
    count = budget_tokens(budget, layout)
    rows, dominant, targets = reference_partition(received, keys, merger_in, layout.valid()[0], count, 0.15625, False)
    with td.apply(model, processor, td.VisionZip(budget)) as handle, torch.no_grad():
        short = processor(images=[image], text=text, return_tensors="pt")
        logits = model(**short).logits[0, -1]
        kept = handle.selections[0]
    order = torch.cat([dominant, targets])
    assert kept[:, 1:].tolist() == torch.stack([order // layout.cols, order % layout.cols], dim=1).tolist()
    # the reference: the stock model fed the merger's output on the reference rows, at the stock positions
    # of the dominant tokens and of each contextual token's target
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    base = model.model
    with torch.no_grad():
        fed = base.visual.merger(rows.reshape(-1, rows.shape[-1] // 4))
        positions, _ = type(base).get_rope_index(base, full["input_ids"], mm_token_type_ids=full["mm_token_type_ids"],
                                                 image_grid_thw=full["image_grid_thw"])
        image_slots = (full["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
        first, last = int(image_slots[0]), int(image_slots[-1])
        picks = torch.cat([torch.arange(first), first + order, torch.arange(last + 1, full["input_ids"].shape[1])])
        short_positions = positions[:, :, picks]
        text_row = torch.arange(short_positions.shape[-1])[None, None]
        expected = model(input_ids=short["input_ids"], attention_mask=short["attention_mask"],
                         position_ids=torch.cat([text_row, short_positions]),
                         mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[fed])}).logits[0, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_qwen_batch_equals_one_by_one_and_generates(qwen25):
    model, processor = qwen25
    processor.tokenizer.padding_side = "left"
    images = [random_image(150, 200, seed=1), random_image(100, 300, seed=2)]
    text = [format_prompt(processor, "what is it?"), format_prompt(processor, "which colour?")]
    with td.apply(model, processor, td.VisionZip(0.3)) as handle, torch.no_grad():
        batch = processor(images=images, text=text, return_tensors="pt", padding=True)
        together, chosen = model(**batch).logits[:, -1], handle.selections
        for i in range(2):
            single = processor(images=[images[i]], text=[text[i]], return_tensors="pt")
            torch.testing.assert_close(model(**single).logits[0, -1], together[i], atol=1e-4, rtol=1e-4)
            assert torch.equal(handle.selections[0], chosen[i])


@pytest.mark.parametrize("builder, served", [
    ("tiny_llava", True), ("tiny_llava_next", True), ("tiny_llava_onevision", True), ("tiny_qwen2_vl", True),
    ("tiny_qwen2_5_vl", True), ("tiny_qwen3_vl", False), ("tiny_internvl", False)])
def test_vllm_serves_it_where_the_family_merges(builder, served):
    """Served in vLLM since the plugin packs merged rows (tests/serving/test_visionzip_serving.py); a family
    without capability "merge" (Qwen3-VL: DeepStack levels; InternVL) is refused by that capability, before any
    engine starts."""
    import tokendrop.tiny
    import tokendrop.vllm

    config = getattr(tokendrop.tiny, builder)(text_layers=1)[0].config
    overrides = tokendrop.vllm.overrides(td.VisionZip(0.2, contextual=0.5))
    if served:
        assert overrides.for_config(config)["architectures"][0].startswith("Tokendrop")
    else:
        with pytest.raises(ValueError, match="VisionZip needs .*capability 'merge'"):
            overrides.for_config(config)
