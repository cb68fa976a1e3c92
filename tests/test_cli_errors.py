"""The CLI's error policy: a user's mistake is one line naming the flag (exit 2), found before any
work; a bug is a traceback and a request to report it (exit 1); finished work is never lost."""

from __future__ import annotations

import json

import pytest

from tokendrop.cli import main


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("model, needle", [
    ("/nonexistent_dir", "/nonexistent_dir"),
    ("nobody-here/no-such-model-xyz", "no-such-model-xyz"),  # offline: the hub cannot be reached
])
def test_a_model_that_cannot_be_loaded_is_a_usage_error(tiny_folder, monkeypatch, capsys, model, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: an earlier test may have imported it online
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    _, image = tiny_folder
    assert main(["run", "--model", model, "--image", str(image), "--max-new-tokens", "1"]) == 2
    one_line_error(capsys, "--model", needle)


def test_an_invalid_checkpoint_is_a_usage_error(tmp_path, tiny_folder, capsys):
    _, image = tiny_folder
    (tmp_path / "config.json").write_text("{ not json")
    assert main(["run", "--model", str(tmp_path), "--image", str(image)]) == 2
    one_line_error(capsys, "--model", str(tmp_path))


def test_an_unsupported_architecture_is_a_usage_error(tmp_path, tiny_folder, capsys):
    from transformers import GPT2Config

    _, image = tiny_folder
    GPT2Config(n_layer=1, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    assert main(["run", "--model", str(tmp_path), "--image", str(image)]) == 2
    one_line_error(capsys, "GPT2LMHeadModel", "supported: LlavaNextForConditionalGeneration")


def test_an_internal_error_shows_its_traceback_and_asks_for_a_report(tiny_folder, monkeypatch, capsys):
    from tokendrop.cli import run as run_cli

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(run_cli, "answer", broken)
    folder, image = tiny_folder
    assert main(["run", "--model", str(folder), "--image", str(image), "--method", "none"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal invariant broke" in err
    assert "internal error" in err and "tokendrop env" in err and "usage" not in err.lower()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tokendrop.data.synth import generate_dataset

    folder = tmp_path_factory.mktemp("data")
    generate_dataset(folder, n=4, seed=5)
    return folder


@pytest.mark.parametrize("argv, needles", [
    (["--json", "missing/folder/r.jsonl"], ["--json", "missing/folder"]),
    (["--markdown", "missing/folder/t.md"], ["--markdown"]),
    (["--plot", "acc.jpg"], ["--plot", ".png"]),
    (["--method", "none,hired", "--budget", "0.2,1.5"], ["--budget must be in (0, 1]", "1.5"]),
    (["--method", "none,hird"], ["--method", "Did you mean 'hired'"]),
    (["--method", "hired", "--method-args", "ratio=0.5"], ["--method-args", "'ratio' is not an option of hired"]),
    (["--metrics", "exact"], ["--metrics", "unknown metric 'exact'"]),
    (["--resume"], ["--resume needs --json PATH"]),
])
def test_eval_checks_every_argument_before_loading_the_model(dataset, tmp_path, monkeypatch, no_model_loading,
                                                            capsys, argv, needles):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--data", str(dataset), "--no-progress", *argv]) == 2
    one_line_error(capsys, *needles)


def test_eval_without_matplotlib_refuses_plot_before_running(dataset, tmp_path, monkeypatch, no_model_loading, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["eval", "--data", str(dataset), "--plot", str(tmp_path / "acc.png"), "--no-progress"]) == 2
    one_line_error(capsys, "--plot needs matplotlib", "tokendrop[plot]")


def test_a_corrupt_image_in_the_dataset_is_named_before_any_work(dataset, tmp_path, no_model_loading, capsys):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    first = json.loads((copy / "questions.jsonl").read_text().splitlines()[0])
    (copy / first["image"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(["eval", "--data", str(copy), "--no-progress"]) == 2
    one_line_error(capsys, "--data", first["image"].split("/")[-1], "questions.jsonl:1")


def test_eval_keeps_finished_configurations_and_resumes(tiny_folder, dataset, tmp_path, monkeypatch, capsys):
    from tokendrop.evaluation import harness

    folder, _ = tiny_folder
    out = tmp_path / "r.jsonl"
    argv = ["eval", "--data", str(dataset), "--model", str(folder), "--method", "none,hired,spatial", "--budget", "0.2",
            "--batch-size", "2", "--max-new-tokens", "2", "--json", str(out), "--no-progress"]
    real, calls = harness.run_config, []

    def crash_on_the_second(model, processor, samples, config, *args):
        calls.append(config.label)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops a long run
        return real(model, processor, samples, config, *args)

    monkeypatch.setattr(harness, "run_config", crash_on_the_second)
    assert main(argv) == 130
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in saved] == ["none"], "the finished configuration is on disk"
    capsys.readouterr()
    assert main(argv) == 2  # the file holds results: never overwritten
    one_line_error(capsys, "--json", "--resume")
    calls.clear()
    monkeypatch.setattr(harness, "run_config", lambda *a: (calls.append(a[3].label), real(*a))[1])
    assert main(argv + ["--resume"]) == 0
    assert calls == ["hired@0.2", "spatial@0.2"], "only the missing configurations ran"
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in saved] == ["none", "hired@0.2", "spatial@0.2"]
    assert "resuming" in capsys.readouterr().out


def test_show_and_run_refuse_an_empty_prompt(tiny_folder, capsys):
    folder, image = tiny_folder
    assert main(["run", "--model", str(folder), "--image", str(image), "--prompt", " "]) == 2
    one_line_error(capsys, "--prompt must not be empty")
