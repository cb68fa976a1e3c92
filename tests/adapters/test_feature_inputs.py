"""The feature kinds of the pre-LLM contract ("features", "projected"), as the families hand them to
`select`, against the stock towers' own hidden states, projector and merger."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tokendrop as td
from sample_inputs import random_image
from tokendrop.families.base import resolve
from tokendrop.loading import format_prompt
from tokendrop.methods import PreLLMMethod, Score
from tokendrop.methods.layout import uniform_counts
from tokendrop.registry import families

SEEN: list = []  # what the probe's `select` was given, one dict per image


@dataclass(frozen=True)
class Probe(PreLLMMethod):
    """Reads both feature kinds and keeps the first tokens of every partition."""

    name = "feature-probe"

    def scores(self):
        return {"before": Score("features"), "after": Score("projected")}

    def counts(self, layout, scores=None):
        return uniform_counts(self.budget, layout)

    def select(self, layout, scores):
        SEEN.append({name: value.clone() for name, value in scores.items()})
        valid = layout.valid()
        return [valid[p].nonzero().squeeze(1)[:count] for p, count in enumerate(self.counts(layout))]


def family(name):
    return next(f for f in families() if f.name == name)


def test_a_feature_kind_has_no_layer_and_needs_the_capability():
    with pytest.raises(ValueError, match="'features' input comes from the feature block only"):
        Score("features", 3)
    assert Probe(0.5).requires() == {"pre_llm", "features"}


@pytest.mark.parametrize("fixture", ["llava_model", "next_model"])
def test_llava_features_and_projected_rows_of_every_tile(fixture, request):
    model, processor = request.getfixturevalue(fixture)
    image = random_image(150, 300)
    SEEN.clear()
    with td.apply(model, processor, Probe(0.5)), torch.no_grad():
        inputs = processor(images=[image], text=["<image>\nQ: hi A:"], return_tensors="pt")
        model(**inputs)
    pixels = inputs["pixel_values"][0] if inputs["pixel_values"].dim() == 5 else inputs["pixel_values"]
    pixels = pixels[: SEEN[0]["before"].shape[0]]
    layer = model.config.vision_feature_layer
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]  # (P, N, Dv)
        projected = model.model.multi_modal_projector(hidden)  # (P, N, D)
    assert SEEN[0]["before"].dtype == SEEN[0]["after"].dtype == torch.float32
    torch.testing.assert_close(SEEN[0]["before"], hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(SEEN[0]["after"], projected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_qwen_merger_input_and_output_in_raster_order(name):
    # "projected" is the stock merger output (raster order); "features", run through the stock merger
    # group by group, gives it back: the same tokens in the same order (Qwen2.5-VL's window order undone)
    model, processor = resolve(family(name).tiny)()
    images = [random_image(150, 200, seed=1), random_image(100, 300, seed=2)]
    text = [format_prompt(processor, "what?")] * 2
    inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
    tower, merge = model.model.visual, model.config.vision_config.spatial_merge_size
    with torch.no_grad():
        stock = type(model.model).get_image_features(model.model, inputs["pixel_values"], inputs["image_grid_thw"])
    stock = stock.pooler_output
    SEEN.clear()
    with td.apply(model, processor, Probe(0.5)), torch.no_grad():
        model(**processor(images=images, text=text, return_tensors="pt", padding=True))
    width = tower.blocks[0].norm1.weight.shape[0]  # Dv
    for i, rows in enumerate(stock):
        before, after = SEEN[i]["before"][0], SEEN[i]["after"][0]
        assert before.shape == (rows.shape[0], merge * merge * width) and after.dtype == torch.float32
        torch.testing.assert_close(after, rows.float(), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(tower.merger(before.view(-1, width)), rows, atol=1e-5, rtol=1e-5)
