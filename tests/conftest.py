"""Tiny random models and images shared by the tests (no downloads)."""

from __future__ import annotations

import sys

import pytest
import torch
from sample_inputs import SIZES, random_image

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def no_model_left_patched():
    """A test that leaves a model patched fails, and the patch is undone so that later tests see stock models."""
    yield
    api = sys.modules.get("tokendrop.api")
    leaked = list(api._ACTIVE) if api is not None else []
    for handle in leaked:
        handle.remove()
    assert not leaked, f"the test left {len(leaked)} model(s) patched: {leaked}"


@pytest.fixture
def registry_restored():
    """Methods and families a test registers are forgotten after it."""
    from tokendrop import families, registry

    saved = dict(registry._registered())
    families.families()  # the table's families are in `saved_families` before the test adds any
    saved_families = dict(families._registered)
    yield
    registry._methods.clear()
    registry._methods.update(saved)
    families._registered.clear()
    families._registered.update(saved_families)


@pytest.fixture(scope="session")
def next_model():
    """(model, processor): tiny LLaVA-NeXT, 112-px tiles (8x8 patches), 8-layer Llama LM with GQA (4 q / 2 kv heads)."""
    from tokendrop.tiny import tiny_llava_next

    model, processor = tiny_llava_next(text_layers=8, kv_heads=2)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="session")
def llava_model():
    from tokendrop.tiny import tiny_llava

    model, processor = tiny_llava(text_layers=4)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="session")
def images():
    return [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from tokendrop.tiny import tiny_llava_next

    model, processor = tiny_llava_next(text_layers=4)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = folder / "img.png"
    random_image(150, 260).save(image)
    return folder, image


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """A tiny random CLIP (vision width 64: the tiny towers') saved with its tokenizer: CDPruner's `clip=PATH`."""
    from tokendrop.tiny import tiny_clip

    folder = tmp_path_factory.mktemp("clip")
    model, tokenizer = tiny_clip()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def qwen_folder(tmp_path_factory):
    """A tiny Qwen2.5-VL saved as a checkpoint folder (weights, tokenizer, image processor, chat template;
    no video processor: it needs torchvision, which these machines cannot import)."""
    from tokendrop.tiny import tiny_qwen2_5_vl

    model, processor = tiny_qwen2_5_vl()
    folder = tmp_path_factory.mktemp("qwen")
    model.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(processor.chat_template)
    image = folder / "img.png"
    random_image(200, 260).save(image)
    return folder, image


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 2-question synthetic dataset folder (a module may override it with its own)."""
    from tokendrop.data.synth import generate_dataset

    folder = tmp_path_factory.mktemp("data")
    generate_dataset(folder, n=2, seed=3)
    return folder


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a command loads a model: the errors it checks must come first."""
    from tokendrop import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_default", refuse)
