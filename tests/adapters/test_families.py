"""The family contract, checked for every family in the registry with every method in the registry.

Each family's tiny random model (its `tiny` builder) runs every method its capabilities allow
through the stock `generate()`, and refuses the others naming the missing capability.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import tokendrop as td
from sample_inputs import random_image, with_tiny_options
from tokendrop.families.base import CAPABILITIES, Family, resolve
from tokendrop.loading import format_prompt
from tokendrop.registry import families, build_methods, family_for, method_class, method_names

SIZES = [(150, 300), (224, 224)]


@pytest.fixture(scope="module", params=families(), ids=lambda f: f.name)
def tiny(request):
    family = request.param
    try:
        model, processor = resolve(family.tiny)()
    except ImportError as err:  # a family this transformers cannot import (Gemma 4 below 5.21 without torchvision)
        pytest.skip(f"{family.name}: {err}")
    processor.tokenizer.padding_side = "left"
    return family, model, processor


def inputs(processor, images):
    prompts = [format_prompt(processor, "what is it?") for _ in images]
    # one image per prompt, nested: Gemma 4's processor reads a flat list as ONE prompt's images
    return processor(images=[[image] for image in images], text=prompts, return_tensors="pt", padding=True)


def test_declaration_is_complete(tiny):
    family, model, processor = tiny
    adapter = family_for(model)
    assert type(adapter) is family and isinstance(adapter, Family)
    assert family.name and family.model_type == model.config.model_type and type(model).__name__ in family.model_classes
    assert resolve(family.config_class) is type(model.config)
    assert adapter.capabilities() <= family.family_capabilities() <= set(CAPABILITIES)
    assert adapter.image_token_id == model.config.image_token_id
    for image in (random_image(*size) for size in SIZES):  # the stock count, known from the size alone
        ids = inputs(processor, [image])["input_ids"]
        assert int((ids == adapter.image_token_id).sum()) == adapter.stock_tokens((image.height, image.width), processor)


@pytest.mark.parametrize("name", method_names())
def test_every_method_runs_or_is_refused_by_capability(tiny, name):
    family, model, processor = tiny
    adapter = family_for(model)
    (method,) = with_tiny_options(build_methods(name, budget=0.3))
    images = [random_image(*size, seed=i) for i, size in enumerate(SIZES)]
    missing = method.requires() - adapter.capabilities()
    if missing:
        with pytest.raises(ValueError, match=f"capability '{sorted(missing)[0]}'"):
            td.apply(model, processor, method)
        return
    reason = refusal(adapter, method)
    if reason is not None:  # an option this model cannot take (Qwen3.5: a ranking layer with linear attention)
        with pytest.raises(ValueError, match=re.escape(reason)):
            td.apply(model, processor, method)
        assert "forward" not in vars(adapter.language_model) and "get_image_features" not in vars(model.model)
        return
    with td.apply(model, processor, method) as handle, torch.no_grad():
        batch = inputs(processor, images)
        out = model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == batch["input_ids"].shape[1] + 2
        if method.stage == "pre":  # the placeholder count is the method's, known before encoding
            for i, image in enumerate(images):
                n = int((batch["input_ids"][i] == adapter.image_token_id).sum())
                assert n == handle.num_tokens((image.height, image.width)) == handle.selections[i].shape[0]
        else:
            depth = len(adapter.language_model.layers)
            assert handle.layer_tokens.shape == (2, depth)
    assert "forward" not in vars(adapter.language_model) and "get_image_features" not in vars(model.model)


def refusal(adapter, method) -> str | None:
    """Why `method` with these options cannot run on this model (apply() refuses it), or None."""
    try:
        adapter.check(method)
    except ValueError as error:
        return str(error)
    return None


def keep_all(name: str):
    """The method at its keep-everything setting, or None (BaseOnly keeps the base image only)."""
    cls = method_class(name)
    if cls.stage == "in":
        return cls(**({"ratio": 1.0} if "ratio" in cls.options() else {"drop": 0.0}))
    if "budget" in cls.options() and cls.options()["budget"].default is dataclasses.MISSING:
        return with_tiny_options(build_methods(name, budget=1.0, keep_newlines=True))[0]  # newlines: the stock packing
    return None


def test_keep_all_settings_are_the_stock_model(tiny):
    family, model, processor = tiny
    adapter = family_for(model)
    images = [random_image(*size, seed=i) for i, size in enumerate(SIZES)]
    batch = inputs(processor, images)
    with torch.no_grad():
        stock = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    for name in method_names():
        method = keep_all(name)
        if method is None or not method.requires() <= adapter.capabilities() or refusal(adapter, method):
            continue
        with td.apply(model, processor, method), torch.no_grad():
            again = inputs(processor, images)
            assert torch.equal(again["input_ids"], batch["input_ids"]), name
            ours = model.generate(**again, max_new_tokens=3, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        assert torch.equal(ours.sequences, stock.sequences), name
        for a, b in zip(ours.logits, stock.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("settings", [dict(num_beams=2, num_return_sequences=2), dict(do_sample=True, num_return_sequences=2)],
                         ids=["beams", "sampling"])
def test_expanded_prompts_at_keep_all_are_the_stock_model(tiny, settings):
    """`generate()` turns each prompt into several rows (beams, sequences per prompt): at keep-all
    every method gives the stock model's sequences (lmms-eval tasks with num_beams > 1 reach this)."""
    family, model, processor = tiny
    adapter = family_for(model)
    images = [random_image(*size, seed=i) for i, size in enumerate(SIZES)]
    run = lambda batch: (torch.manual_seed(0), model.generate(**batch, max_new_tokens=3, **settings))[1]  # noqa: E731
    with torch.no_grad():
        stock = run(inputs(processor, images))
    for name in method_names():
        method = keep_all(name)
        if method is None or not method.requires() <= adapter.capabilities() or refusal(adapter, method):
            continue
        with td.apply(model, processor, method), torch.no_grad():
            assert torch.equal(run(inputs(processor, images)), stock), name
