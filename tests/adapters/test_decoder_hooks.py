"""The in-LLM capability comes from a family's decoder hook (`Family.decoder`, `tokendrop.engine.decoders`).

A family grants `in_llm` only by naming a hook; a decoder the hook cannot run (Gemma-style rotary
tables per layer type, linear-attention layers) is refused at apply() naming the capability and why,
before anything is patched.
"""

from __future__ import annotations

import types

import pytest
import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

import tokendrop as td
from tokendrop.engine.decoders import DeepStackDecoder, LlamaDecoder
from tokendrop.families.base import Family
from tokendrop.families.llava.llava import LlavaAdapter
from tokendrop.registry import family_for


def tiny_gemma3():
    """A tiny random Gemma 3 (SigLIP tower, Gemma 3 decoder: a rotary table per layer type)."""
    torch.manual_seed(0)
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1, image_token_index=299,
                          boi_token_index=297, eoi_token_index=298)
    return Gemma3ForConditionalGeneration(config).eval()


class Gemma3Family(Family):
    """A family that names the Llama hook for a decoder it cannot run (what a hasty declaration does)."""

    name = "gemma3-test"
    model_type = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    config_class = "Gemma3Config"
    decoder = "tokendrop.engine.decoders:LlamaDecoder"


@pytest.fixture
def gemma3(registry_restored):
    td.register_family(Gemma3Family)
    return tiny_gemma3()


def test_a_gemma_style_decoder_is_refused_at_apply_naming_the_capability_and_why(gemma3):
    assert Gemma3Family.family_capabilities() == {"in_llm", "renumber"}  # declared ...
    assert "in_llm" not in family_for(gemma3).capabilities()  # ... but this decoder cannot run under the hook
    forward = gemma3.model.language_model.forward
    with pytest.raises(ValueError, match=r"capability 'in_llm'.*rotary table per layer type"):
        td.apply(gemma3, None, td.FastV())
    assert gemma3.model.language_model.forward == forward and "forward" not in vars(gemma3.model.language_model)


def test_a_family_without_a_decoder_hook_has_no_in_llm(registry_restored, llava_model):
    model, processor = llava_model

    class NoHook(LlavaAdapter):
        name = "llava-no-hook"
        decoder = ""

    assert "in_llm" not in NoHook.family_capabilities()
    with pytest.raises(ValueError, match="capability 'in_llm'"):
        NoHook.config_check(model.config, td.PyramidDrop())
    assert "in_llm" in LlavaAdapter.family_capabilities()


def test_layer_types_the_hook_does_not_run_are_named_from_the_config():
    config = types.SimpleNamespace(layer_types=["linear_attention", "full_attention"])
    assert LlamaDecoder.config_unfit(config) == "its decoder has linear_attention layers"
    assert LlamaDecoder.config_unfit(types.SimpleNamespace(layer_types=["sliding_attention", "full_attention"])) == ""
    assert LlamaDecoder.config_unfit(types.SimpleNamespace()) == ""


def test_masks_already_built_are_refused_with_the_reason(llava_model):
    model, processor = llava_model
    lm = model.model.language_model
    with td.apply(model, processor, td.FastV(k=1)), pytest.raises(ValueError, match="dict per layer type"):
        lm(inputs_embeds=torch.zeros(1, 3, model.config.text_config.hidden_size),
           attention_mask={"full_attention": None})


def test_the_deepstack_hook_adds_features_to_the_slots_still_present():
    hook = DeepStackDecoder.__new__(DeepStackDecoder)
    visual = torch.tensor([[False, True, True, False], [True, False, False, True]])
    extras = {"visual_pos_masks": visual, "deepstack_visual_embeds": [torch.arange(4.0)[:, None] + 1]}
    rows = hook.start(extras)
    assert rows.tolist() == [[-1, 0, 1, -1], [2, -1, -1, 3]]  # row-major order of the visual slots
    kept = rows[:, [0, 2, 3]]  # slot 1 dropped
    out = hook.after(0, torch.zeros(2, 3, 1), kept, extras)
    assert out[..., 0].tolist() == [[0, 2, 0], [3, 0, 4]]
    assert hook.after(1, torch.zeros(2, 3, 1), kept, extras).abs().sum() == 0  # only the first layers get features
