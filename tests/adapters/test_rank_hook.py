"""In-LLM methods own their ranking (`InLLMMethod.rank`): a method that ranks by something other than
one attention row is one subclass, and the engine still enforces counts, ties and the query rule."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tokendrop as td
from sample_inputs import PROMPTS, random_image


@dataclass(frozen=True)
class NormDrop(td.FastV):
    """FastV's schedule, ranked by the L2 norm of the hidden states entering layer k (a test method)."""

    name = "norm-drop-test"

    def rank(self, boundary, view):
        return view.inputs(boundary).float().norm(dim=-1)  # (B, L)


@dataclass(frozen=True)
class WrongShape(td.FastV):
    name = "wrong-shape-test"

    def rank(self, boundary, view):
        return view.image.float()[:, :1]


@dataclass(frozen=True)
class FarLayer(td.FastV):
    name = "far-layer-test"

    def rank(self, boundary, view):
        return view.attention_row(boundary + 1)


def test_a_method_ranks_by_its_own_rule(next_model):
    """The kept image tokens are the top ones by the method's own scores, computed independently here
    from the stock model's hidden states."""
    model, processor = next_model
    inputs = processor(images=[random_image(150, 300)], text=[PROMPTS[0]], return_tensors="pt")
    method = NormDrop(k=2, drop=0.5)
    with torch.no_grad():
        entering = model(**inputs, output_hidden_states=True).hidden_states[2][0]  # (L, D) input of layer 2
        with td.apply(model, processor, method) as handle:
            model(**inputs)
            kept = handle.kept_positions[0]
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    n = image.numel()
    top = image[torch.argsort(entering[image].norm(dim=-1), descending=True, stable=True)[: round(n * 0.5)]]
    text = (inputs["input_ids"][0] != model.config.image_token_id).nonzero().squeeze(1)
    assert kept.tolist() == sorted(text.tolist() + top.tolist())
    assert handle.layer_tokens[0].tolist()[2:] == [round(n * 0.5)] * (len(handle.layer_tokens[0]) - 2)


def test_the_default_rank_is_the_attention_row_of_the_ranking_layer(next_model):
    model, processor = next_model
    inputs = processor(images=[random_image(224, 224)], text=[PROMPTS[1]], return_tensors="pt")
    with torch.no_grad():
        with td.apply(model, processor, td.FastV(k=2, drop=0.5)) as handle:
            model(**inputs)
            default = handle.kept_positions.clone()

        @dataclass(frozen=True)
        class Explicit(td.FastV):
            name = "explicit-test"

            def rank(self, boundary, view):
                return view.attention_row(boundary - 1)

        with td.apply(model, processor, Explicit(k=2, drop=0.5)) as handle:
            model(**inputs)
            assert torch.equal(handle.kept_positions, default)


@pytest.mark.parametrize("method, error, needle", [
    (WrongShape(k=2, drop=0.5), TypeError, r"WrongShape.rank must return a \(B, L\)"),
    (FarLayer(k=2, drop=0.5), ValueError, "ranks with layer 1 or 2, got 3"),
])
def test_a_rank_that_breaks_the_contract_is_named(next_model, method, error, needle):
    model, processor = next_model
    inputs = processor(images=[random_image(224, 224)], text=[PROMPTS[0]], return_tensors="pt")
    with td.apply(model, processor, method), torch.no_grad(), pytest.raises(error, match=needle):
        model(**inputs)
