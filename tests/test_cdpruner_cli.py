"""CDPruner through every CLI subcommand and the lmms-eval model, its CLIP a folder given as
`--method-args clip=PATH` (`model_args ... clip=PATH`); `cost` counts its CLIP's work."""

from __future__ import annotations

import json

import pytest

from tokendrop.cli import main

# 150x260 fits the 224x224 pinpoint best -> 2x2 tiles of 8x8 patches: B = floor(0.2 * 5 * 64) = 64
KEPT = 64


def cdpruner_args(clip_folder) -> list[str]:
    return ["--method", "cdpruner", "--budget", "0.2", "--method-args", f"clip={clip_folder}"]


def test_run(tiny_folder, clip_folder, capsys):
    folder, image = tiny_folder
    assert main(["run", "--model", str(folder), "--image", str(image), "--prompt", "what colour is the circle?",
                 *cdpruner_args(clip_folder), "--max-new-tokens", "2", "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["visual_tokens"] == KEPT and record["visual_tokens_stock"] > KEPT


def test_show(tiny_folder, clip_folder, tmp_path, capsys):
    folder, image = tiny_folder
    out = tmp_path / "kept.png"
    assert main(["show", "--model", str(folder), "--image", str(image), *cdpruner_args(clip_folder), "--out", str(out)]) == 0
    assert f"total {KEPT} of" in capsys.readouterr().out and out.read_bytes()[:4] == b"\x89PNG"


def test_eval(tiny_folder, clip_folder, dataset, tmp_path, capsys):
    folder, _ = tiny_folder
    out = tmp_path / "r.json"
    assert main(["eval", "--data", str(dataset), "--model", str(folder), *cdpruner_args(clip_folder), "--no-progress",
                 "--json", str(out)]) == 0
    assert "cdpruner" in capsys.readouterr().out and out.exists()


def test_bench(tiny_folder, clip_folder, tmp_path):
    folder, _ = tiny_folder
    out = tmp_path / "b.json"
    assert main(["bench", "--model", str(folder), *cdpruner_args(clip_folder), "--repeats", "1", "--warmup", "0",
                 "--new-tokens", "2", "--no-progress", "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    assert record["visual_tokens"] == record["analytic_visual_tokens"] == KEPT
    assert record["scoring_flops"] > 0  # its CLIP's work (`cost.relevance_scoring_flops`)


def test_methods_lists_its_clip_option(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    line = out[out.index("cdpruner:"):].splitlines()[1]
    assert "clip='openai/clip-vit-large-patch14-336'" in line and "clip_tokenizer=None" in line


def test_cost_counts_the_clip_head_and_text_tower(tmp_path, capsys):
    from transformers import CLIPConfig

    # openai/clip-vit-large-patch14-336's shapes (config only: cost reads no weights)
    CLIPConfig(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                max_position_embeddings=77),
               vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=336, patch_size=14),
               projection_dim=768).save_pretrained(tmp_path / "clip")
    out = tmp_path / "cost.json"
    assert main(["cost", "--arch", "llava-v1.6-vicuna-7b", "--image-size", "672x672", "--text-tokens", "64",
                 "--method", "divprune,cdpruner", "--budget", "0.2", "--method-args", f"clip={tmp_path / 'clip'}",
                 "--json", str(out)]) == 0
    divprune, cdpruner = json.loads(out.read_text())
    # 672x672 -> base + 2x2 tiles = 5 tiles of 576 patches; 64 text tokens -> one 77-token segment
    head = 5 * 576 * 1024 * 768  # visual_projection of every patch
    text = 12 * (4 * 77 * 768**2 + 2 * 77 * 77 * 768 + 2 * 77 * 768 * 3072) + 768 * 768  # 12 layers + text_projection
    assert cdpruner["scoring_flops"] - divprune["scoring_flops"] == pytest.approx(2.0 * (head + text))
    assert cdpruner["visual_tokens"] == divprune["visual_tokens"]


def test_lmms_eval_model_args_reach_the_clip(tiny_folder, clip_folder, monkeypatch):
    """`--model_args pretrained=...,method=cdpruner,budget=0.2,clip=PATH`: lmms-eval hands these to the model's
    constructor as keywords; a request is answered with CDPruner's count of image tokens."""
    import importlib.util
    import sys
    import types

    from PIL import Image

    if importlib.util.find_spec("lmms_eval") is None:  # stand-ins for the two names the module imports
        for name, names in {"lmms_eval": {}, "lmms_eval.api": {}, "lmms_eval.api.instance": {"Instance": object},
                            "lmms_eval.api.model": {"lmms": type("lmms", (), {})}}.items():
            module = types.ModuleType(name)
            module.__dict__.update(names)
            monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "tokendrop.integrations.lmms_eval", raising=False)
    from tokendrop.integrations.lmms_eval import TokenDrop

    folder, image = tiny_folder
    model = TokenDrop(pretrained=str(folder), method="cdpruner", budget=0.2, clip=str(clip_folder), batch_size=1,
                      max_new_tokens=1)
    (method,) = model.methods
    assert method.clip == str(clip_folder)
    model.task_dict = {"t": {"test": {0: {"image": Image.open(image)}}}}
    request = ("what colour is the circle?", {"max_new_tokens": 1}, lambda doc: [doc["image"]], 0, "t", "test")

    class Request:
        args = request

    assert len(model.generate_until([Request()])) == 1
    assert model.visual_tokens == [KEPT] and "_loaded" in vars(method)  # the folder's CLIP was loaded and used
