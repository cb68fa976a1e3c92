"""`tokendrop run` on a tiny model: JSON records, and bad arguments exit 2 with a message."""

from __future__ import annotations

import json

import pytest

from tokendrop.cli import main


def test_run_json_records(tiny_folder, capsys):
    folder, image = tiny_folder
    code = main(["run", "--model", str(folder), "--image", str(image), "--prompt", "what?", "--method", "hired+pdrop",
                 "--budget", "0.2", "--max-new-tokens", "2", "--json"])
    assert code == 0
    (record,) = json.loads(capsys.readouterr().out)
    # 150x260 fits the 224x224 pinpoint best -> 2x2 tiles of 8x8 patches: B = floor(0.2 * 5 * 64) = 64
    assert record["visual_tokens"] == 64 and record["visual_tokens_stock"] > 64
    assert record["equivalent_tokens"] < 64 and record["prefill_s"] <= record["total_s"]


@pytest.mark.parametrize("argv, message", [
    (["--method", "hird"], "Did you mean 'hired'?"),
    (["--method", "hired", "--budget", "1.5"], "budget must be in (0, 1]"),
    (["--method", "pdrop", "--method-args", "layers=[8,x]"], "option layers='[8,x]' is not a valid"),
    (["--method", "fastv", "--method-args", "k=9"], "k must be in [0, 4) for a 4-layer LLM"),
    (["--prompt", ""], "--prompt must not be empty"),
    (["--image", "/no/such/file.png"], "cannot read image"),
])
def test_run_bad_arguments_exit_2(tiny_folder, capsys, argv, message):
    folder, image = tiny_folder
    base = ["run", "--model", str(folder), "--image", str(image), "--max-new-tokens", "1"]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_env_json(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"tokendrop", "torch", "transformers", "python"} <= set(info)


def test_run_a_qwen_checkpoint_folder(qwen_folder, capsys):
    # loaded with stock classes from a folder; the processor is built image-only without torchvision
    folder, image = qwen_folder
    code = main(["run", "--model", str(folder), "--image", str(image), "--method", "none,dominant,random+fastv,pdrop",
                 "--budget", "0.25", "--max-new-tokens", "2", "--warmup", "0", "--json"])
    assert code == 0
    records = {r["label"]: r for r in json.loads(capsys.readouterr().out)}
    stock = records["none"]["visual_tokens"]
    assert records["dominant@0.25"]["visual_tokens"] == int(0.25 * stock)  # exact budget of the merged grid
    assert records["pdrop"]["visual_tokens"] == stock and records["pdrop"]["equivalent_tokens"] < stock
    assert records["random+fastv@0.25"]["equivalent_tokens"] < records["random+fastv@0.25"]["visual_tokens"]


def test_hired_on_a_qwen_checkpoint_names_the_missing_capability(qwen_folder, capsys):
    folder, image = qwen_folder
    assert main(["run", "--model", str(folder), "--image", str(image), "--method", "hired"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tokendrop run:")]  # (transformers' loading bar aside)
    assert len(errors) == 1 and "[CLS] token (capability 'cls_token')" in errors[0] and "Traceback" not in err
