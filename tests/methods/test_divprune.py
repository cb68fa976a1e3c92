"""DivPrune: the greedy max-min step by hand, and the kept tokens of tiny models against a reference
written from the algorithm (full distance matrix, as the paper states it) on the stock model's own
projected features, in the order the stock model packs them."""

from __future__ import annotations

import math

import pytest
import torch

import tokendrop as td
from sample_inputs import random_image
from tokendrop.families.base import resolve
from tokendrop.loading import format_prompt
from tokendrop.methods import Layout, budget_tokens
from tokendrop.methods.divprune import max_min_diversity
from tokendrop.registry import families, family_for


def reference_divprune(features: torch.Tensor, k: int) -> torch.Tensor:
    """The algorithm on the whole (V, V) matrix of d = 1 - cos: first the column whose second-smallest
    entry is largest, then the largest minimum distance to the picked rows; first index on ties."""
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    picked = [int(torch.argmax(distance.topk(2, dim=0, largest=False).values[1]))]
    while len(picked) < k:
        closest = distance[picked].min(dim=0).values
        closest[picked] = float("-inf")
        picked.append(int(torch.argmax(closest)))
    return torch.tensor(sorted(picked))


# ---- the greedy step by hand ---------------------------------------------------------------------
ANGLES = (0.0, 90.0, 120.0)  # three unit vectors: d(a,b) = 1, d(a,c) = 1.5, d(b,c) = 1 - cos 30 = 0.134


def three_tokens() -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in ANGLES])


def test_three_token_worked_example():
    # distance matrix        a      b      c      second-smallest per column: a 1.0, b 0.134, c 0.134
    #                   a  0      1      1.5      -> first pick a (its nearest other token is farthest)
    #                   b  1      0      0.134    min distance to {a}: b 1.0, c 1.5 -> second pick c
    #                   c  1.5    0.134  0
    features = three_tokens()
    assert max_min_diversity(features, 1).tolist() == [0]
    assert max_min_diversity(features, 2).tolist() == [0, 2]
    assert max_min_diversity(features, 3).tolist() == [0, 2, 1]
    layout = Layout(grid=1, grid_cols=3)  # one partition of three tokens
    assert td.DivPrune(0.7).select(layout, {"projected": features[None]})[0].tolist() == [0, 2]  # floor(0.7 * 3) = 2


def test_scale_does_not_matter_and_duplicates_are_never_picked_twice():
    features = three_tokens() * torch.tensor([[3.0], [0.5], [7.0]])  # cosine ignores the norms
    assert max_min_diversity(features, 2).tolist() == [0, 2]
    same = torch.ones(4, 5)  # every distance 0: the picks are the lowest indices, each once
    assert max_min_diversity(same, 3).tolist() == [0, 1, 2]


def test_the_first_pick_reads_the_whole_matrix_in_chunks(monkeypatch):
    from tokendrop.methods import divprune

    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    whole = max_min_diversity(features, 12)
    monkeypatch.setattr(divprune, "CHUNK_ELEMENTS", 7)  # a column or two at a time
    assert torch.equal(max_min_diversity(features, 12), whole)
    assert torch.equal(whole.sort().values, reference_divprune(features, 12))


# ---- tiny models -----------------------------------------------------------------------------------
def family(name):
    return next(f for f in families() if f.name == name)


def stock_llava_rows(model, inputs) -> list[torch.Tensor]:
    """Per image, the stock model's projected rows in the order it feeds them, newlines removed."""
    base = model.model
    pixels = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
    with torch.no_grad():
        rows = list(type(base).get_image_features(base, **pixels).pooler_output)
    newline = getattr(base, "image_newline", None)
    if newline is not None:
        rows = [r[~(r == newline).all(dim=1)] for r in rows]
    return rows


def image_pixels(pixel_values: torch.Tensor, i: int, layout) -> torch.Tensor:
    """(P, 3, S, S) the tiles of image i (LLaVA-NeXT pads the tile dimension; LLaVA-1.5 has one)."""
    return pixel_values[i][: layout.num_partitions] if pixel_values.dim() == 5 else pixel_values[i : i + 1]


def picked_rows(model, selections, pixel_values_of_image) -> torch.Tensor:
    """The projected rows at (partition, row, col) of `selections` (K, 3), from the stock tower + projector."""
    base = model.model
    layer = model.config.vision_feature_layer
    with torch.no_grad():
        hidden = base.vision_tower(pixel_values_of_image, output_hidden_states=True).hidden_states[layer][:, 1:]
        projected = base.multi_modal_projector(hidden)  # (P, N, D)
    grid = int(math.isqrt(projected.shape[1]))
    part, row, col = selections.unbind(1)
    return projected[part, row * grid + col]


@pytest.mark.parametrize("fixture", ["llava_model", "next_model"])
def test_llava_keeps_the_reference_picks_and_feeds_their_rows(fixture, request):
    model, processor = request.getfixturevalue(fixture)
    adapter = family_for(model)
    images = [random_image(150, 300, seed=1), random_image(224, 224, seed=2)]
    prompts = ["<image>\nQ: what is it? A:", "<image>\nQ: how many? A:"]
    stock = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    expected_rows = stock_llava_rows(model, stock)
    with td.apply(model, processor, td.DivPrune(0.25)) as handle, torch.no_grad():
        short = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        logits = model(**short).logits[:, -1]
        selections = handle.selections
    embeds = model.get_input_embeddings()(short["input_ids"])
    for i, image in enumerate(images):
        layout = adapter.layout((image.height, image.width))
        k = budget_tokens(0.25, layout)
        assert selections[i].shape[0] == k == int((short["input_ids"][i] == model.config.image_token_id).sum())
        reference = reference_divprune(expected_rows[i], k)  # indices into the stock packed rows
        ours = picked_rows(model, selections[i], image_pixels(stock["pixel_values"], i, layout))
        torch.testing.assert_close(ours, expected_rows[i][reference], atol=1e-5, rtol=1e-5)
        embeds[i, short["input_ids"][i] == model.config.image_token_id] = expected_rows[i][reference]
    with torch.no_grad():  # the stock model fed the reference rows
        expected = model(inputs_embeds=embeds, attention_mask=short["attention_mask"]).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_llava_next_batch_equals_one_by_one(next_model):
    model, processor = next_model
    images = [random_image(150, 300, seed=3), random_image(330, 100, seed=4)]
    prompts = ["<image>\nQ: what is it? A:", "<image>\nQ: which colour is it? A:"]
    with td.apply(model, processor, td.DivPrune(0.2)) as handle, torch.no_grad():
        batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        together, chosen = model(**batch).logits[:, -1], handle.selections
        for i in range(2):
            single = processor(images=[images[i]], text=[prompts[i]], return_tensors="pt")
            torch.testing.assert_close(model(**single).logits[0, -1], together[i], atol=1e-4, rtol=1e-4)
            assert torch.equal(handle.selections[0], chosen[i])


def test_qwen2_5_vl_keeps_the_reference_picks_of_the_merger_output():
    model, processor = resolve(family("qwen2.5-vl").tiny)()
    images = [random_image(150, 200, seed=5), random_image(100, 300, seed=6)]
    text = [format_prompt(processor, "what?")] * 2
    stock = processor(images=images, text=text, return_tensors="pt", padding=True)
    base = model.model
    with torch.no_grad():
        rows = type(base).get_image_features(base, stock["pixel_values"], stock["image_grid_thw"]).pooler_output
    with td.apply(model, processor, td.DivPrune(0.3)) as handle, torch.no_grad():
        short = processor(images=images, text=text, return_tensors="pt", padding=True)
        model.generate(**short, max_new_tokens=1, do_sample=False)
        for i, grid in enumerate(stock["image_grid_thw"].tolist()):
            cols = grid[2] // 2
            kept = handle.selections[i][:, 1] * cols + handle.selections[i][:, 2]
            k = budget_tokens(0.3, Layout(grid=grid[1] // 2, grid_cols=cols))
            assert kept.numel() == k == int((short["input_ids"][i] == model.config.image_token_id).sum())
            assert torch.equal(kept, reference_divprune(rows[i].float(), k))
