"""Bad input gets a clear error naming the parameter, and nothing is left half-patched."""

from __future__ import annotations

import pytest
import torch

import tokendrop as td


def assert_untouched(model, processor):
    assert "get_image_features" not in vars(model.model)
    assert "forward" not in vars(model.model.language_model)
    assert "replace_image_token" not in vars(processor)
    assert "_get_num_multimodal_tokens" not in vars(processor)
    assert not model.model._forward_pre_hooks


def test_unsupported_model_names_supported_classes():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2))
    with pytest.raises(TypeError, match="model must be one of LlavaNextForConditionalGeneration, .*; got LlamaForCausalLM"):
        td.apply(lm, None, td.PyramidDrop())


def test_processor_of_another_model(next_model, llava_model):
    model, processor = next_model
    _, other = llava_model
    with pytest.raises(ValueError, match="processor does not belong to the model"):
        td.apply(model, other, td.HiRED(0.2))
    assert_untouched(model, processor)


def test_processor_with_other_pinpoints(next_model):
    from tokendrop.tiny import tiny_llava_next

    model, processor = next_model
    _, other = tiny_llava_next(tile=56)
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        td.apply(model, other, td.HiRED(0.2))


def test_apply_twice_without_remove(next_model):
    model, processor = next_model
    handle = td.apply(model, processor, td.HiRED(0.2))
    try:
        with pytest.raises(ValueError, match="already patched"):
            td.apply(model, processor, td.HiRED(0.4))
    finally:
        handle.remove()
    assert_untouched(model, processor)
    td.apply(model, processor, td.HiRED(0.4)).remove()  # fine after remove()


def test_failure_half_way_leaves_nothing_patched(next_model):
    model, processor = next_model
    with pytest.raises(ValueError, match=r"layers must be strictly increasing in \[1, 8\)"):
        td.apply(model, processor, td.HiRED(0.2), td.PyramidDrop(layers=[2, 9]))
    assert_untouched(model, processor)


@pytest.mark.parametrize("methods, error, message", [
    ((), ValueError, "needs at least one method"),
    ((td.HiRED,), TypeError, "got class HiRED"),
    (("hired",), TypeError, "method instances"),
    ((td.HiRED(0.2), td.SpatialDrop(0.2)), ValueError, "at most one pre-LLM method"),
    ((td.PyramidDrop(), td.FastV()), ValueError, "one in-LLM method"),
    ((td.FastV(k=8),), ValueError, r"k must be in \[0, 8\)"),
    ((td.HiRED(0.2, final_layer=7),), ValueError, r"final_layer must be in \[-3, 3\)"),
])
def test_bad_methods(next_model, methods, error, message):
    model, processor = next_model
    with pytest.raises(error, match=message):
        td.apply(model, processor, *methods)
    assert_untouched(model, processor)


def test_pre_llm_needs_processor(next_model):
    model, _ = next_model
    with pytest.raises(TypeError, match="processor is required"):
        td.apply(model, None, td.HiRED(0.2))


@pytest.mark.parametrize("make, message", [
    (lambda: td.PyramidDrop(layers=[16, 8]), "strictly increasing"),
    (lambda: td.PyramidDrop(layers=[0, 8]), "strictly increasing and >= 1"),
    (lambda: td.PyramidDrop(ratio=0.0), r"ratio must be in \(0, 1\]"),
    (lambda: td.PyramidDrop(ratio=1.5), r"ratio must be in \(0, 1\]"),
    (lambda: td.PyramidDrop(positions="keep"), "positions must be one of"),
    (lambda: td.FastV(k=-1), r"k must be an int in \[0, depth\)"),
    (lambda: td.FastV(drop=1.0), r"drop must be in \[0, 1\)"),
    (lambda: td.FastV(drop=-0.1), r"drop must be in \[0, 1\]"),
    (lambda: td.RandomDrop(0.2, seed="x"), "seed must be an int"),
])
def test_bad_in_llm_arguments(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_context_manager_restores_on_error(next_model):
    model, processor = next_model
    with pytest.raises(RuntimeError):
        with td.apply(model, processor, td.HiRED(0.2)):
            raise RuntimeError("user code failed")
    assert_untouched(model, processor)


def test_handle_num_tokens(next_model):
    model, processor = next_model
    with td.apply(model, processor, td.HiRED(0.2)) as handle:
        assert handle.num_tokens((224, 224)) == 64  # floor(0.2 * 5 * 64)
        assert torch.is_tensor(torch.tensor(handle.num_tokens((150, 300))))


def test_processor_token_count_query_follows_the_method(next_model, images):
    from tokendrop.loading import format_prompt

    model, processor = next_model
    sizes = [[img.height, img.width] for img in images]
    stock = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    with td.apply(model, processor, td.HiRED(0.2)):
        counted = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
        for img, n in zip(images, counted):  # what the patched processor writes for that image
            ids = processor(text=[format_prompt(processor, "q")], images=[img], return_tensors="pt")["input_ids"]
            assert (ids == model.config.image_token_id).sum().item() == n
    assert all(c < s for c, s in zip(counted, stock))
    assert_untouched(model, processor)
    assert processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == stock


def test_llava_processor_token_count_query_follows_the_method(llava_model, images):
    from tokendrop.loading import format_prompt

    model, processor = llava_model
    size = [images[0].height, images[0].width]
    with td.apply(model, processor, td.RandomDrop(0.25, seed=0)):
        (n,) = processor._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens
        ids = processor(text=[format_prompt(processor, "q")], images=[images[0]], return_tensors="pt")["input_ids"]
        assert (ids == model.config.image_token_id).sum().item() == n
    assert processor._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens[0] > n
