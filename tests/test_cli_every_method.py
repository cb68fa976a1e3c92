"""Every registered method through every CLI subcommand that runs a model (run, show, eval, bench) and through
`cost`, on the tiny LLaVA-NeXT (show refuses the in-LLM ones in one line: it draws what reaches the LLM); the
registry drives the list, so a new method is covered without an edit here. CDPruner takes its CLIP as a folder
(`--method-args clip=PATH`; its `cost` with a full-size CLIP config is in test_cdpruner_cli.py)."""

from __future__ import annotations

import json

import pytest

from tokendrop.cli import main
from tokendrop.registry import method_class, method_names


def method_argv(name: str, clip_folder) -> list[str]:
    argv = ["--method", name, "--budget", "0.2"]
    return argv + (["--method-args", f"clip={clip_folder}"] if name == "cdpruner" else [])


@pytest.mark.parametrize("name", method_names())
def test_every_subcommand_runs_it(name, tiny_folder, clip_folder, dataset, tmp_path, capsys):
    folder, image = tiny_folder
    argv = method_argv(name, clip_folder)
    pre = method_class(name).stage == "pre"

    assert main(["run", "--model", str(folder), "--image", str(image), "--prompt", "what colour is the circle?", *argv,
                 "--max-new-tokens", "2", "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert (record["visual_tokens"] < record["visual_tokens_stock"]) == pre

    out = tmp_path / "kept.png"
    assert main(["show", "--model", str(folder), "--image", str(image), *argv, "--out", str(out)]) == (0 if pre else 2)
    if pre:
        assert out.read_bytes()[:4] == b"\x89PNG"
    else:  # show draws what is kept before the LLM: one line says so
        assert "in-LLM methods drop later" in capsys.readouterr().err

    assert main(["eval", "--data", str(dataset), "--model", str(folder), *argv, "--max-new-tokens", "2", "--no-progress",
                 "--json", str(tmp_path / "eval.json")]) == 0
    assert len(json.loads((tmp_path / "eval.json").read_text())["predictions"]) == 2

    assert main(["bench", "--model", str(folder), *argv, "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
                 "--no-progress", "--json", str(tmp_path / "bench.json")]) == 0
    (bench,) = json.loads((tmp_path / "bench.json").read_text())
    assert bench["visual_tokens"] == bench["analytic_visual_tokens"]

    if name != "cdpruner":
        assert main(["cost", *argv, "--json", str(tmp_path / "cost.json")]) == 0
        (cost,) = json.loads((tmp_path / "cost.json").read_text())
        assert (cost["visual_tokens"] < 2928) == pre  # llava-v1.6-vicuna-7b at 672x672: 2928 stock visual tokens
