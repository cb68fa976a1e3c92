"""Checkpoints in the layout of the hub's (`tokendrop.loading.save_hub_layout`): the bundled model is saved
that way, transformers loads every tensor of it, and a folder in the layout transformers 5 writes is named
before a vLLM server starts (vLLM loads the hub layout only)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tokendrop.loading import ModelLoadError, bundled_model_path, check_hub_layout, save_hub_layout
from tokendrop.vllm.server import server_command

LLAVA = ["tiny_llava", "tiny_llava_next", "tiny_llava_onevision"]


def _tiny(name):
    import tokendrop.tiny

    return getattr(tokendrop.tiny, name)()


def weight_names(folder) -> list[str]:
    names = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as weights:
            names += list(weights.keys())
    return names


def loads_every_tensor(model, folder):
    """`folder` loads into `model`'s class with no missing or unexpected weight, each equal to `model`'s."""
    loaded, info = type(model).from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


@pytest.mark.parametrize("name", LLAVA)
def test_llava_towers_are_saved_under_vision_model_and_load_back_the_same(name, tmp_path):
    model, processor = _tiny(name)
    save_hub_layout(model, processor, tmp_path)
    tower = [n for n in weight_names(tmp_path) if n.startswith("vision_tower.")]
    assert tower and all(n.startswith("vision_tower.vision_model.") for n in tower)
    loads_every_tensor(model, tmp_path)
    check_hub_layout(str(tmp_path))


def test_sharded_checkpoints_are_renamed_in_every_shard_and_the_index(tmp_path):
    model, processor = _tiny("tiny_llava_next")
    save_hub_layout(model, processor, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1 and sorted(index) == sorted(weight_names(tmp_path))
    assert not any(n.startswith("vision_tower.") and ".vision_model." not in n for n in index)
    loads_every_tensor(model, tmp_path)


def test_a_family_already_in_the_hub_layout_is_saved_as_transformers_saves_it(tmp_path):
    model, processor = _tiny("tiny_qwen2_5_vl")
    model.save_pretrained(tmp_path / "plain")
    save_hub_layout(model, None, tmp_path / "hub")
    assert weight_names(tmp_path / "hub") == weight_names(tmp_path / "plain")


def test_a_folder_in_the_transformers_5_layout_is_named_before_a_server_starts(tmp_path):
    model, processor = _tiny("tiny_llava_next")
    model.save_pretrained(tmp_path)  # transformers 5: vision_tower.embeddings.*
    processor.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="vision_tower.vision_model.*save_hub_layout") as err:
        server_command(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(bundled_model_path() is None, reason="no bundled model in this checkout")
def test_the_bundled_model_is_in_the_hub_layout_and_loads_every_tensor(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlavaNextForConditionalGeneration

    folder = bundled_model_path()
    tower = [n for n in weight_names(folder) if n.startswith("vision_tower.")]
    assert tower and all(n.startswith("vision_tower.vision_model.") for n in tower)
    check_hub_layout(str(folder))
    model, info = LlavaNextForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    save_hub_layout(model, None, tmp_path)  # what was loaded, saved again: the file's tensors, name by name
    shipped, loaded = load_file(folder / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert shipped.keys() == loaded.keys()
    assert [n for n in shipped if not torch.equal(shipped[n], loaded[n])] == []
