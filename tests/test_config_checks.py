"""Issue 25 review: every subcommand that loads a model checks each configuration against the model's
config before the weights load (`Family.config_check`, shared with `apply()`), `eval --json` to a
device or pipe, records kept when their file cannot be written, and a missing --model folder."""

from __future__ import annotations

import json

import pytest

from tokendrop.cli import main
from tokendrop.tiny import tiny_llava_next, tiny_qwen2_vl


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.replace("\r", "\n").splitlines() if ": error: " in line]
    assert "Traceback" not in err and len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], err
    return errors[0]


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    """A saved tiny Qwen2-VL (config and weights: the checks must not need the weights)."""
    model, processor = tiny_qwen2_vl()
    folder = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(folder)
    return folder


    monkeypatch.setattr(loading, "load_model", refuse)


# ---- the library: config_check answers what check answers, from the config alone ------------------
@pytest.mark.parametrize("build, method", [
    (tiny_qwen2_vl, "hired"),                  # no [CLS] token
    (tiny_llava_next, "fastv"),                # k beyond the depth (below)
    (tiny_qwen2_vl, "fastv"),
])
def test_config_check_raises_what_check_raises(build, method):
    from tokendrop.families import family_for
    from tokendrop.registry import build_methods

    model, _ = build()
    depth = model.config.get_text_config().num_hidden_layers
    assert depth == len(family_for(model).language_model.layers)  # where each family's config keeps the depth
    options = {"k": depth + 5} if method == "fastv" else {}
    (m,) = build_methods(method, budget=0.2, **options)
    family = family_for(model)
    with pytest.raises(ValueError) as loaded:
        family.check(m)
    with pytest.raises(ValueError) as config_only:
        type(family).config_check(model.config, m)
    assert str(config_only.value) == str(loaded.value)


def test_config_check_refuses_a_score_layer_the_tower_has_not():
    from tokendrop.families import family_of
    from tokendrop.registry import build_methods

    model, _ = tiny_llava_next()
    family = family_of(model_type=model.config.model_type)
    (m,) = build_methods("hired", budget=0.2, init_layer=99)
    with pytest.raises(ValueError, match="99"):
        family.config_check(model.config, m)


# ---- A: the CLI checks the config before the weights --------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["run"], ["--method hired", "cls_token"]),
    (["bench"], ["--method hired", "cls_token"]),
    (["show", "--out", "{tmp}/k.png"], ["--method hired", "cls_token"]),
    (["eval", "--data", "{data}", "--method", "none,hired"], ["--method hired", "cls_token"]),
    (["eval", "--data", "{data}", "--method", "fastv", "--method-args", "k=99"], ["--method fastv", "99"]),
])
def test_a_configuration_the_model_cannot_run_is_refused_before_the_weights_load(
        qwen2_folder, dataset, tmp_path, no_model_loading, capsys, argv, needles):
    argv = [a.format(tmp=tmp_path, data=dataset) for a in argv]
    assert main([*argv, "--model", str(qwen2_folder)]) == 2
    one_line_error(capsys, *needles)


# ---- B: eval --json to a device, a pipe or an empty file ----------------------------------------
def test_eval_json_help_says_it_writes_a_file(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "print it instead of the table" not in out


def test_eval_json_appends_to_an_empty_file(dataset, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    out.touch()
    assert main(["eval", "--data", str(dataset), "--model", "tiny", "--method", "none", "--json", str(out),
                 "--no-progress", "--max-new-tokens", "1"]) == 0
    assert [json.loads(line)["label"] for line in out.read_text().splitlines()] == ["none"]


def test_eval_json_writes_to_a_character_device(dataset, capsys):
    assert main(["eval", "--data", str(dataset), "--model", "tiny", "--method", "none", "--json", "/dev/null",
                 "--no-progress", "--max-new-tokens", "1"]) == 0


# ---- C: a record or table that cannot be written is printed -------------------------------------
def test_a_record_that_cannot_be_appended_is_printed(dataset, tmp_path, monkeypatch, capsys):
    from tokendrop.evaluation.results import ResultsFile

    def full(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ResultsFile, "add", full)
    out = tmp_path / "r.jsonl"
    assert main(["eval", "--data", str(dataset), "--model", "tiny", "--method", "none", "--json", str(out),
                 "--no-progress", "--max-new-tokens", "1"]) == 2
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert [r["label"] for r in records] == ["none"]
    assert "stdout" in captured.err and "No space left" in captured.err


def test_a_markdown_table_that_cannot_be_written_is_printed(dataset, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    md = tmp_path / "t.md"
    monkeypatch.setattr(Path, "write_text", full)
    assert main(["eval", "--data", str(dataset), "--model", "tiny", "--method", "none", "--markdown", str(md),
                 "--no-progress", "--max-new-tokens", "1"]) == 2
    captured = capsys.readouterr()
    assert "| none" in captured.out and "--markdown" in captured.err


# ---- D: a missing local folder --------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["/some/missing/folder", "./missing-model", "../missing-model", "{tmp}/missing"])
def test_a_missing_model_folder_is_named(tmp_path, capsys, spec):
    spec = spec.format(tmp=tmp_path)
    assert main(["run", "--model", spec]) == 2
    line = one_line_error(capsys, f"--model: no such folder: {spec}")
    assert "Repo id" not in line


def test_eval_json_writes_to_a_pipe(dataset, tmp_path, capsys):
    import os
    import threading

    fifo = tmp_path / "records"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    assert main(["eval", "--data", str(dataset), "--model", "tiny", "--method", "none", "--json", str(fifo),
                 "--no-progress", "--max-new-tokens", "1"]) == 0
    reader.join(timeout=30)
    assert [json.loads(line)["label"] for line in received[0].splitlines()] == ["none"]


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="no /dev/full here")
def test_eval_json_to_a_full_device_is_a_write_error_that_keeps_the_record(dataset, capsys):
    assert main(["eval", "--data", str(dataset), "--model", "tiny", "--method", "none", "--json", "/dev/full",
                 "--no-progress", "--max-new-tokens", "1"]) == 2
    captured = capsys.readouterr()
    assert [json.loads(line)["label"] for line in captured.out.splitlines() if line.startswith("{")] == ["none"]
    one_line_error_text = [line for line in captured.err.splitlines() if ": error: " in line]
    assert len(one_line_error_text) == 1 and "could not write the record of none" in one_line_error_text[0]
