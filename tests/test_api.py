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
    assert "__deepcopy__" not in vars(model) and "__deepcopy__" not in vars(processor)
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


def test_apply_without_methods_is_a_no_op_handle(next_model, images):
    model, processor = next_model
    inputs = processor(images=images[:1], text=["<image>\nQ: hi A:"], return_tensors="pt")
    with torch.no_grad():
        stock = model(**inputs).logits
    with td.apply(model, processor) as handle:
        assert_untouched(model, processor)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, stock)
        assert handle.layer_tokens is None and handle.equivalent_tokens is None and handle.selections == []
    td.apply(model, processor, td.HiRED(0.2)).remove()  # the no-op left nothing that blocks a real apply


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
    (lambda: td.FastV(drop=-0.1), r"drop must be in \[0, 1\), got -0.1"),
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


# ---- copies, pickling, lifetime ----------------------------------------------------------------------
def image_tokens(model, processor, image, prompt="<image>\nQ: hi A:"):
    ids = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"]
    return int((ids == model.config.image_token_id).sum())


@pytest.mark.parametrize("method", [td.HiRED(0.2), td.FastV(k=2, drop=0.5)], ids=repr)
def test_deepcopy_of_a_patched_model_is_an_independent_stock_model(next_model, images, method):
    import copy

    model, processor = next_model
    inputs = processor(images=images[:1], text=["<image>\nQ: hi A:"], return_tensors="pt")
    with torch.no_grad():
        stock = model(**inputs).logits[0, -1]
    with td.apply(model, processor, method) as handle:
        twin = copy.deepcopy(model)
        assert "__deepcopy__" not in vars(twin) and "get_image_features" not in vars(twin.model)
        assert "forward" not in vars(twin.model.language_model) and not twin.model._forward_pre_hooks
        handle.layer_tokens = None
        with torch.no_grad():
            copied = twin(**inputs).logits[0, -1]  # stock input ids: the copy is the stock model
        assert handle.layer_tokens is None, "the copy never writes the original's handle"
        assert twin.model.vision_tower is not model.model.vision_tower
    torch.testing.assert_close(copied, stock, atol=1e-5, rtol=1e-5)
    assert_untouched(model, processor)
    assert_untouched(twin, processor)


def test_deepcopy_of_a_patched_processor_is_an_independent_stock_processor(next_model, images):
    import copy

    model, processor = next_model
    stock = image_tokens(model, processor, images[0])
    with td.apply(model, processor, td.HiRED(0.2)):
        twin = copy.deepcopy(processor)
        assert image_tokens(model, twin, images[0]) == stock, "the copy is stock while the handle is live"
        assert image_tokens(model, processor, images[0]) == 64 < stock, "the original stays patched"
        assert twin._get_num_multimodal_tokens(image_sizes=[[224, 224]]).num_image_tokens == [stock]
    assert image_tokens(model, twin, images[0]) == stock
    assert_untouched(model, twin)


def test_a_deep_copied_pair_is_the_stock_pair(next_model, images):
    """`m2, p2 = deepcopy(m), deepcopy(p)` under a pre-LLM handle: both copies follow one rule (stock),
    so the pair runs together and equals the stock model."""
    import copy

    model, processor = next_model
    prompt = "<image>\nQ: hi A:"
    with torch.no_grad():
        stock = model.generate(**processor(images=images[:1], text=[prompt], return_tensors="pt"), max_new_tokens=3)
        with td.apply(model, processor, td.HiRED(0.2)):
            m2, p2 = copy.deepcopy(model), copy.deepcopy(processor)
            copied = m2.generate(**p2(images=images[:1], text=[prompt], return_tensors="pt"), max_new_tokens=3)
    assert torch.equal(copied, stock)


def test_a_patched_processor_pickles(next_model, images):
    import copy
    import pickle

    model, processor = next_model
    with td.apply(model, processor, td.HiRED(0.2)):
        clone = pickle.loads(pickle.dumps(processor))  # what a spawned DataLoader worker receives
    assert image_tokens(model, clone, images[0]) == 64, "the worker's copy writes the method's count"
    assert image_tokens(model, copy.deepcopy(clone), images[0]) > 64, "and a deep copy of it is stock"
    assert "replace_image_token" in vars(clone) and not hasattr(clone.replace_image_token, "__closure__")


@pytest.mark.parametrize("method", [td.FastV(), td.HiRED(0.2), td.RandomDrop(0.3)], ids=repr)
def test_a_model_that_is_never_removed_is_freed(method):
    import gc
    import weakref

    from tokendrop.tiny import tiny_llava_next

    model, processor = tiny_llava_next()
    alive = weakref.ref(model)
    handle = td.apply(model, processor, method)
    del model, handle
    gc.collect()
    assert alive() is None, "a patched model nobody holds is collected (the processor does not keep it)"


@pytest.mark.parametrize("method, size, message", [
    (td.HiRED(0.001), (224, 224), r"keeps no visual token of an image of 224x224 pixels \(5 partition\(s\) of 64 patches\).*0.003125"),
    (td.RandomDrop(0.001), (150, 300), r"keeps no visual token of an image of 150x300 pixels"),
])
def test_budgets_that_keep_no_token_are_refused_with_size_and_budget(next_model, images, method, size, message):
    model, processor = next_model
    from sample_inputs import random_image

    with td.apply(model, processor, method):
        with pytest.raises(ValueError, match=message):
            processor(images=[random_image(*size)], text=["<image>"], return_tensors="pt")
        assert "budget=0.001" in repr(method)


def test_llava15_budget_that_keeps_no_token_is_refused(llava_model, images):
    model, processor = llava_model
    with td.apply(model, processor, td.HiRED(0.01)):
        with pytest.raises(ValueError, match=r"HiRED\(budget=0.01.*keeps no visual token of every image \(1 partition\(s\) of 64"):
            processor(images=images[:1], text=["<image>"], return_tensors="pt")


# ---- numbers: NumPy scalars accepted, seeds in range ---------------------------------------------------
def test_numpy_scalars_are_numbers():
    import numpy as np

    assert td.HiRED(np.float32(0.2), alpha=np.float64(0.5)) == td.HiRED(0.2, alpha=0.5)
    assert td.FastV(k=np.int64(2), drop=np.float32(0.25)) == td.FastV(k=2, drop=0.25)
    assert td.PyramidDrop(layers=[np.int32(2), 4], ratio=np.float16(0.5)) == td.PyramidDrop(layers=(2, 4), ratio=0.5)
    assert td.RandomDrop(0.2, seed=np.uint8(7)) == td.RandomDrop(0.2, seed=7)
    assert type(td.HiRED(np.float32(0.2)).budget) is float


@pytest.mark.parametrize("make", [lambda: td.RandomDrop(0.2, seed=2**70), lambda: td.FastV(k=0, seed=2**70),
                                  lambda: td.RandomDrop(0.2, seed=-1)])
def test_seeds_out_of_range_fail_at_construction(make):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 9223372036854775807\]"):
        make()
