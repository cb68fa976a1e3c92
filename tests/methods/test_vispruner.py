"""VisPruner: the matching loop by hand (an odd residual, where the official split crashes), and the kept
tokens of tiny LLaVA-1.5 / LLaVA-NeXT against a reference written from the official loop on the eager
tower's own attention maps and hidden states."""

from __future__ import annotations

import copy

import pytest
import torch

import tokendrop as td
from sample_inputs import random_image
from tokendrop.methods import Layout, allocate, budget_tokens
from tokendrop.registry import family_for


def reference_keep(cls_row, features, valid, count, important: int):
    """The official `encode_images` loop on one partition's valid tokens (T = count, T_imp given), with
    ceil(R / 2) even tokens when R is odd and at most all of them dropped per round."""
    candidates = valid.nonzero().squeeze(1)
    order = candidates[torch.argsort(cls_row[candidates], descending=True, stable=True)]
    kept_important, residual = order[:important], order[important:]
    diverse = count - important
    unit = features / features.norm(dim=-1, keepdim=True)
    while diverse > 0:
        r = min(8, residual.numel() - diverse)
        if r <= 0:
            break
        a, b = unit[residual[::2]], unit[residual[1::2]]
        similarity = (a @ b.T).max(dim=-1).values
        distinct = torch.argsort(similarity, descending=True, stable=True)[min(r, a.shape[0]):]
        residual = torch.cat([residual[::2][distinct], residual[1::2]])
    kept = torch.cat([kept_important, residual]) if diverse > 0 else kept_important
    return kept.sort().values


# ---- by hand -----------------------------------------------------------------------------------------
def test_odd_residual_by_hand():
    # 8 tokens, [CLS] attention falling with the index; keep T = 6 with important_ratio 0.2: T_imp = 1
    # (token 0), the residual 1..7 (R = 7, odd: the official split crashes) is thinned to 5.
    # Even positions: tokens 1, 3, 5, 7; odd: 2, 4, 6. Tokens 1 and 2 are the same vector, and 5 and 6:
    # the even tokens' best similarities are 1, 0, 1, 0; r = min(8, 7 - 5) = 2 drops tokens 1 and 5.
    features = torch.eye(8)
    features[2], features[6] = features[1], features[5]
    cls = torch.arange(8, 0, -1.0)
    layout = Layout(grid=1, grid_cols=8)
    method = td.VisPruner(0.75, important_ratio=0.2)  # floor(0.75 * 8) = 6
    keep = method.select(layout, {"cls": cls[None], "features": features[None]})
    assert keep[0].tolist() == [0, 2, 3, 4, 6, 7]


@pytest.mark.parametrize("count,ratio", [(1, 0.5), (2, 0.5), (3, 0.0), (9, 0.5), (13, 0.3), (40, 0.5), (64, 0.5)])
def test_any_parity_keeps_exactly_the_count(count, ratio):
    gen = torch.Generator().manual_seed(count)
    cls, features = torch.rand(1, 64, generator=gen), torch.randn(1, 64, 16, generator=gen)
    layout = Layout(grid=8)
    budget = count / 64
    keep = td.VisPruner(budget, important_ratio=ratio).select(layout, {"cls": cls, "features": features})[0]
    assert keep.numel() == count
    important = int(count * ratio)
    assert torch.equal(keep, reference_keep(cls[0], features[0], torch.ones(64, dtype=torch.bool), count, important))
    top = torch.argsort(cls[0], descending=True, stable=True)[:important]
    assert bool(torch.isin(top, keep).all()), "the important tokens are kept"


# ---- tiny models -----------------------------------------------------------------------------------
def image_pixels(pixel_values: torch.Tensor, i: int, layout) -> torch.Tensor:
    """(P, 3, S, S) the tiles of image i (LLaVA-NeXT pads the tile dimension; LLaVA-1.5 has one)."""
    return pixel_values[i][: layout.num_partitions] if pixel_values.dim() == 5 else pixel_values[i : i + 1]


def eager_inputs(model, pixels):
    """(cls (T, N) mean over heads, features (T, N, Dv)) of the feature block, from an eager copy of the tower."""
    eager = copy.deepcopy(model.model.vision_tower)
    eager.set_attn_implementation("eager")
    layer = model.config.vision_feature_layer
    block = layer % (len(eager.encoder.layers) + 1) - 1  # the block whose output is hidden_states[layer]
    with torch.no_grad():
        out = eager(pixels, output_attentions=True, output_hidden_states=True)
    return out.attentions[block][:, :, 0, 1:].mean(dim=1), out.hidden_states[layer][:, 1:]


@pytest.mark.parametrize("fixture", ["llava_model", "next_model"])
def test_llava_keeps_the_official_loops_tokens(fixture, request):
    model, processor = request.getfixturevalue(fixture)
    adapter = family_for(model)
    images = [random_image(150, 300, seed=1), random_image(224, 224, seed=2)]
    prompts = ["<image>\nQ: what is it? A:", "<image>\nQ: how many? A:"]
    method = td.VisPruner(0.3, important_ratio=0.5)
    with td.apply(model, processor, method) as handle, torch.no_grad():
        short = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        logits = model(**short).logits[:, -1]
        selections = handle.selections
    embeds = model.get_input_embeddings()(short["input_ids"])
    for i, image in enumerate(images):
        layout = adapter.layout((image.height, image.width))
        cls, features = eager_inputs(model, image_pixels(short["pixel_values"], i, layout))
        valid, grid = layout.valid(), layout.grid
        counts = allocate(budget_tokens(0.3, layout), [1.0] * layout.num_partitions, layout.valid_counts())
        part, row, col = selections[i].unbind(1)
        for p, count in enumerate(counts):
            expected = reference_keep(cls[p], features[p], valid[p], count, int(count * 0.5))
            got = (row * grid + col)[part == p].sort().values
            assert torch.equal(got, expected), (i, p)
        with torch.no_grad():  # the stock projector on the kept rows, in the order the adapter packs them
            rows = model.model.multi_modal_projector(features[part, row * grid + col])
        assert rows.shape[0] == int((short["input_ids"][i] == model.config.image_token_id).sum())
        embeds[i, short["input_ids"][i] == model.config.image_token_id] = rows
    with torch.no_grad():
        expected = model(inputs_embeds=embeds, attention_mask=short["attention_mask"]).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_llava_next_batch_equals_one_by_one(next_model):
    model, processor = next_model
    images = [random_image(150, 300, seed=3), random_image(330, 100, seed=4)]
    prompts = ["<image>\nQ: what is it? A:", "<image>\nQ: which colour is it? A:"]
    with td.apply(model, processor, td.VisPruner(0.2, important_ratio=0.4)) as handle, torch.no_grad():
        batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        together, chosen = model(**batch).logits[:, -1], handle.selections
        for i in range(2):
            single = processor(images=[images[i]], text=[prompts[i]], return_tensors="pt")
            torch.testing.assert_close(model(**single).logits[0, -1], together[i], atol=1e-4, rtol=1e-4)
            assert torch.equal(handle.selections[0], chosen[i])


def test_qwen_has_no_cls_token_and_is_refused_by_name():
    from tokendrop.families.base import resolve
    from tokendrop.registry import families

    qwen = next(f for f in families() if f.name == "qwen2.5-vl")
    model, processor = resolve(qwen.tiny)()
    need = r"VisPruner needs a vision tower with a \[CLS\] token \(capability 'cls_token'\)"
    with pytest.raises(ValueError, match=need):
        td.apply(model, processor, td.VisPruner(0.3))
