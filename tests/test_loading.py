"""`load_model` on checkpoints whose processor owns a video processor, on a machine without torchvision
(the image-only processors), and those processors pickled and saved."""

from __future__ import annotations

import importlib.util
import json
import pickle

import pytest
import torch
from sample_inputs import random_image

from tokendrop.loading import format_prompt, load_model

without_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                                         reason="with torchvision, load_model builds the stock processors")


def _inputs(processor):
    image = random_image(150, 200)
    return processor(images=[image], text=[format_prompt(processor, "what?")], return_tensors="pt")


def _same_inputs(a, b):
    x, y = _inputs(a), _inputs(b)
    assert sorted(x) == sorted(y)
    for key in x:
        assert torch.equal(x[key], y[key]), key


def _tiny(name):
    import tokendrop.tiny

    return getattr(tokendrop.tiny, name)()


# ---- row 13: the image-only processors pickle (DataLoader workers) and save --------------------------
@pytest.mark.parametrize("name", ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl", "tiny_llava_onevision"])
def test_image_only_processor_pickles_to_the_same_inputs(name):
    _, processor = _tiny(name)
    copy = pickle.loads(pickle.dumps(processor))
    assert type(copy) is type(processor) and copy.video_processor is None
    _same_inputs(copy, processor)


@without_torchvision
def test_saved_image_only_processor_loads_back_to_the_same_inputs(tmp_path):
    model, processor = _tiny("tiny_qwen2_5_vl")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor" and "video_processor" not in saved
    _, loaded = load_model(str(tmp_path), device="cpu")
    _same_inputs(loaded, processor)
    assert loaded.chat_template == processor.chat_template
    pickle.loads(pickle.dumps(loaded))


# ---- row 14: a LLaVA-OneVision checkpoint loads without torchvision ---------------------------------
@pytest.fixture(scope="module")
def onevision_folder(tmp_path_factory):
    """A tiny LLaVA-OneVision saved as the hub's checkpoints are: weights, tokenizer, image processor and a
    processor_config.json naming LlavaOnevisionProcessor (whose video processor needs torchvision)."""
    model, processor = _tiny("tiny_llava_onevision")
    folder = tmp_path_factory.mktemp("onevision")
    model.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    settings = {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": processor.num_image_tokens,
                "vision_feature_select_strategy": processor.vision_feature_select_strategy,
                "vision_aspect_ratio": processor.vision_aspect_ratio, "image_token": "<image>", "video_token": "<video>"}
    (folder / "processor_config.json").write_text(json.dumps(settings))
    return folder, processor


@without_torchvision
def test_onevision_checkpoint_loads_without_torchvision(onevision_folder):
    folder, processor = onevision_folder
    model, loaded = load_model(str(folder), device="cpu")
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration" and loaded.video_processor is None
    assert loaded.tokenizer.padding_side == "left"
    _same_inputs(loaded, processor)


@without_torchvision
def test_run_on_a_onevision_checkpoint_answers(onevision_folder, capsys):
    from tokendrop.cli import main

    folder, _ = onevision_folder
    assert main(["run", "--model", str(folder), "--method", "none", "--max-new-tokens", "1", "--warmup", "0"]) == 0
    assert "[none]" in capsys.readouterr().out


@without_torchvision
def test_when_the_image_only_processor_fails_too_the_error_is_one_line_naming_torchvision(onevision_folder,
                                                                                          monkeypatch, capsys):
    import tokendrop.processors
    from tokendrop.cli import main

    def fails(*args):
        raise ImportError("LlavaOnevisionImageProcessorPil requires the Torchvision library\nmore text")

    monkeypatch.setattr(tokendrop.processors, "load_image_only", fails)
    assert main(["run", "--model", str(onevision_folder[0]), "--method", "none", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "needs torchvision here (pip install torchvision)" in err
