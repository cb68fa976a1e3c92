"""DominantDrop and the received-attention scores it reads, against the towers' own attention."""

from __future__ import annotations

import copy

import pytest
import torch

import tokendrop as td
from sample_inputs import random_image
from tokendrop.families.base import resolve
from tokendrop.loading import format_prompt
from tokendrop.registry import families, family_for
from tokendrop.scoring import received_attention, received_attention_clip, received_attention_qwen


def family(name):
    return next(f for f in families() if f.name == name)


# ---- CLIP / SigLIP: the eager tower's maps ---------------------------------------------------------
@pytest.mark.parametrize("name", ["llava-next", "llava-onevision"])
def test_clip_and_siglip_received_attention_equals_the_eager_maps(name):
    model, _ = resolve(family(name).tiny)()
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    size = tower.config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tower(pixels, output_attentions=True, output_hidden_states=True)
        for i, layer in enumerate(tower.encoder.layers):
            expected = out.attentions[i].mean(dim=(1, 2))  # (T, N): over heads and queries
            torch.testing.assert_close(received_attention_clip(layer, out.hidden_states[i]), expected, atol=1e-6, rtol=1e-5)


def test_received_attention_in_query_blocks_equals_one_map(monkeypatch):
    from tokendrop import scoring

    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(50, 3, 8, generator=gen), torch.randn(50, 3, 8, generator=gen)
    full = received_attention(q, k, 0.3, [(0, 20), (20, 50)])
    monkeypatch.setattr(scoring, "RECEIVED_BLOCK_ELEMENTS", {"cpu": 7})  # blocks of a query or two
    torch.testing.assert_close(received_attention(q, k, 0.3, [(0, 20), (20, 50)]), full)
    probs = ((q[20:].transpose(0, 1) @ k[20:].transpose(0, 1).transpose(1, 2)) * 0.3).softmax(-1)  # (H, 30, 30)
    torch.testing.assert_close(full[20:], probs.mean(dim=(0, 1)))
    assert torch.allclose(full[:20].sum(), torch.tensor(1.0))


# ---- Qwen-VL: every block, window and full ----------------------------------------------------------
QWEN = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


@pytest.fixture(scope="module", params=QWEN)
def qwen(request):
    model, processor = resolve(family(request.param).tiny)()
    return model, processor


def qwen_inputs(processor, sizes=((150, 200), (100, 300))):
    images = [random_image(*size, seed=i) for i, size in enumerate(sizes)]
    return processor(images=images, text=[format_prompt(processor, "what?")] * len(images), return_tensors="pt",
                     padding=True)


def test_qwen_block_attention_recomputed_from_its_inputs_gives_the_blocks_output(qwen):
    # Per block (window blocks included): the probabilities recomputed from the block's own inputs,
    # times V and the output projection, equal what the block's attention returned; the received
    # attention is those probabilities averaged over heads and queries.
    model, processor = qwen
    inputs = qwen_inputs(processor)
    tower = model.model.visual
    captured, hooks = {}, []
    for i, block in enumerate(tower.blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, kw, i=i: captured.setdefault(i, {}).update(
            hidden=a[0], cu=kw["cu_seqlens"], rope=kw["position_embeddings"]), with_kwargs=True))
        hooks.append(block.attn.register_forward_hook(lambda m, a, kw, out, i=i: captured[i].update(out=out), with_kwargs=True))
    with torch.no_grad():
        tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    for hook in hooks:
        hook.remove()
    assert len(captured) == len(tower.blocks)
    for i, block in enumerate(tower.blocks):
        c, attn = captured[i], block.attn
        with torch.no_grad():
            x = block.norm1(c["hidden"])
            q, k, v = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).unbind(1)
            cos, sin = (t[:, None] for t in c["rope"])
            half = q.shape[-1] // 2
            rot = lambda t: t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin  # noqa: E731
            q, k = rot(q), rot(k)
            bounds = c["cu"].tolist()
            outputs, received = [], []
            for s, e in zip(bounds[:-1], bounds[1:]):
                probs = (q[s:e].transpose(0, 1) @ k[s:e].transpose(0, 1).transpose(1, 2) * attn.scaling).softmax(-1)
                outputs.append((probs @ v[s:e].transpose(0, 1)).transpose(0, 1).reshape(e - s, -1))
                received.append(probs.mean(dim=(0, 1)))
            torch.testing.assert_close(attn.proj(torch.cat(outputs)), c["out"], atol=1e-5, rtol=1e-4)
            ours = received_attention_qwen(block, c["hidden"], c["cu"], c["rope"])
        torch.testing.assert_close(ours, torch.cat(received), atol=1e-6, rtol=1e-5)


def test_qwen_scores_are_put_back_in_raster_order(qwen):
    # The merger's output, regrouped the way the scores are (4 patch rows per token, in the blocks'
    # order, then argsort of the block order), is the stock pooler output (raster order).
    model, processor = qwen
    inputs = qwen_inputs(processor)
    adapter = family_for(model)
    tower = model.model.visual
    last = {}
    hook = tower.blocks[-1].register_forward_hook(lambda m, a, out: last.update(out=out))
    with torch.no_grad():
        stock = tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        merged = tower.merger(last["out"])  # one row per 4 patch rows, in the blocks' order
    hook.remove()
    order = adapter.block_order(inputs["image_grid_thw"])
    if order is not None:
        merged = merged[torch.argsort(order)]
    torch.testing.assert_close(merged, stock)


def test_qwen_dominant_drop_keeps_the_top_received_tokens(qwen):
    model, processor = qwen
    adapter = family_for(model)
    block = adapter.config_score_block(model.config, None)
    inputs = qwen_inputs(processor)
    captured = {}
    hook = model.model.visual.blocks[block].register_forward_pre_hook(
        lambda m, a, kw: captured.update(hidden=a[0], cu=kw["cu_seqlens"], rope=kw["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    hook.remove()
    with torch.no_grad():
        per_patch = received_attention_qwen(model.model.visual.blocks[block], captured["hidden"], captured["cu"], captured["rope"])
    tokens = per_patch.view(-1, 4).sum(dim=1)
    order = adapter.block_order(inputs["image_grid_thw"])
    if order is not None:
        tokens = tokens[torch.argsort(order)]
    sizes = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    with td.apply(model, processor, td.DominantDrop(0.3)) as handle, torch.no_grad():
        short = qwen_inputs(processor)
        model(**short)
        for i, scores in enumerate(torch.split(tokens, sizes)):
            cols = int(inputs["image_grid_thw"][i, 2]) // 2
            kept = handle.selections[i][:, 1] * cols + handle.selections[i][:, 2]
            n = int(kept.numel())
            expected = torch.argsort(scores, descending=True, stable=True)[:n].sort().values
            assert torch.equal(kept, expected), i


def test_qwen2_5_window_blocks_are_refused():
    model, processor = resolve(family("qwen2.5-vl").tiny)()
    with pytest.raises(ValueError, match=r"layer 0 of Qwen2.5-VL's vision tower uses window attention.*\[1, 3\]"):
        td.apply(model, processor, td.DominantDrop(0.3, layer=0))
    td.apply(model, processor, td.DominantDrop(0.3, layer=1)).remove()


# ---- LLaVA-NeXT and OneVision ---------------------------------------------------------------------
def test_llava_next_dominant_drop_keeps_each_partitions_top_received_tokens(next_model):
    from tokendrop.methods.layout import uniform_counts

    model, processor = next_model
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    image = random_image(150, 300)
    with td.apply(model, processor, td.DominantDrop(0.3)) as handle, torch.no_grad():
        inputs = processor(images=[image], text=["<image>"], return_tensors="pt")
        model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        kept = handle.selections[0]
    layout = family_for(model).layout((150, 300))
    with torch.no_grad():
        maps = eager(inputs["pixel_values"][0, : layout.num_partitions], output_attentions=True).attentions
    block = len(eager.encoder.layers) - 2  # the feature layer (-2)
    received = maps[block].mean(dim=(1, 2))[:, 1:]  # (P, N) patches, [CLS] column dropped
    valid = layout.valid()
    for p, count in enumerate(uniform_counts(0.3, layout)):
        got = kept[kept[:, 0] == p]
        flat = got[:, 1] * layout.grid + got[:, 2]
        scores = received[p].masked_fill(~valid[p], float("-inf"))
        expected = torch.argsort(scores, descending=True, stable=True)[:count].sort().values
        assert torch.equal(flat.sort().values, expected), p


def test_onevision_gets_a_pre_llm_method():
    model, processor = resolve(family("llava-onevision").tiny)()
    images = [random_image(100, 60), random_image(56, 112, seed=1)]
    prompts = [format_prompt(processor, "what?")] * 2
    stock = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**stock).logits[:, -1]
    with td.apply(model, processor, td.DominantDrop(1.0, keep_newlines=True)), torch.no_grad():  # keep-all: stock
        same = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        assert torch.equal(same["input_ids"], stock["input_ids"])
        torch.testing.assert_close(model(**same).logits[:, -1], expected, atol=1e-5, rtol=1e-5)
    with td.apply(model, processor, td.DominantDrop(0.3)) as handle, torch.no_grad():
        short = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        model.generate(**short, max_new_tokens=2, do_sample=False)
        for i, image in enumerate(images):
            n = int((short["input_ids"][i] == model.config.image_token_id).sum())
            assert n == handle.num_tokens((image.height, image.width)) == handle.selections[i].shape[0]
    with pytest.raises(ValueError, match=r"\[CLS\] token.*DominantDrop"):
        td.apply(model, processor, td.HiRED(0.2))


def test_onevision_refuses_what_has_no_exact_layout():
    from tokendrop.families.llava.llava_onevision import OnevisionGeometry

    geometry = OnevisionGeometry(56, 4, ((224, 224), (56, 56)), max_tiles=9)  # 4x4 tiles: more than anyres_max_9
    assert geometry.pooled_canvas((224, 224)) == (12, 12)  # the stock model interpolates 16x16 down to 12x12
    with pytest.raises(ValueError, match="pools its canvas"):
        geometry.layout((224, 224))
    assert geometry.layout((50, 50)).num_tiles == 1 and geometry.pooled_canvas((50, 50)) is None
    model, processor = resolve(family("llava-onevision").tiny)()
    with td.apply(model, processor, td.DominantDrop(0.5)):
        with pytest.raises(ValueError, match="one image per sample"):
            processor(images=[[random_image(50, 50), random_image(40, 60)]], text=["<image><image>"], return_tensors="pt")
