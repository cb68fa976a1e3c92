"""`tokendrop eval --resume`: a file cut by a kill, other settings, a grid that grows, a write that fails.

Issue 25 rows 3 and 4. Every eval here runs the tiny random LLaVA-NeXT on 2-3 questions with 2 new tokens.
"""

from __future__ import annotations

import errno
import json

import pytest

from tokendrop.cli import main
from tokendrop.evaluation import harness, results
from tokendrop.evaluation.results import ResultsFile


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tokendrop.data.synth import generate_dataset

    folder = tmp_path_factory.mktemp("data")
    generate_dataset(folder, n=8, seed=1)
    return folder


@pytest.fixture(autouse=True)
def quiet_loading():
    """No "Loading weights" bar on stderr: the reports checked below are the only lines there."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.fixture
def ran(monkeypatch):
    """The labels of the configurations that ran, in order."""
    labels, real = [], harness.run_config

    def spy(model, processor, samples, config, *args):
        labels.append(config.label)
        return real(model, processor, samples, config, *args)

    monkeypatch.setattr(harness, "run_config", spy)
    return labels


def forbid_model_loading(monkeypatch):
    """Fail the test if a command loads a model from now on: a refusal must come first."""
    from tokendrop import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the resume was checked")

    monkeypatch.setattr(loading, "load_default", refuse)


def eval_argv(dataset, folder, out, *extra):
    return ["eval", "--data", str(dataset), "--model", str(folder), "--limit", "2", "--batch-size", "2",
            "--max-new-tokens", "2", "--json", str(out), "--no-progress", *extra]


def json_lines(path) -> list[dict]:
    """Every line of a results file as a record: fails on any line that is not one (valid JSON lines)."""
    text = path.read_text()
    assert text.endswith("\n"), "the last record ends its line"
    return [json.loads(line) for line in text.splitlines()]


def one_line(err: str) -> str:
    err = err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---- row 3: a last line cut by a kill ------------------------------------------------------------------
def test_resume_drops_a_last_line_cut_by_a_kill_and_keeps_every_finished_record(tiny_folder, dataset, tmp_path,
                                                                                ran, capsys):
    folder, _ = tiny_folder
    out = tmp_path / "r.jsonl"
    argv = eval_argv(dataset, folder, out, "--method", "none,random")
    assert main(argv + ["--budget", "0.2,0.4"]) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    finished = b"".join(lines[:2])
    out.write_bytes(finished + lines[2][: len(lines[2]) // 2])  # the kill cut the third write in half
    capsys.readouterr()
    ran.clear()

    assert main(argv + ["--budget", "0.2,0.4,0.6", "--resume"]) == 0
    err = one_line(capsys.readouterr().err)
    assert str(out) in err and "dropped" in err and "unfinished" in err
    assert ran == ["random@0.4", "random@0.6"], "the cut configuration runs again, the finished ones do not"
    assert out.read_bytes().startswith(finished), "finished records are kept byte for byte"
    assert [r["label"] for r in json_lines(out)] == ["none", "random@0.2", "random@0.4", "random@0.6"]

    for budgets, new in [("0.2,0.4,0.6,0.8", "random@0.8"), ("0.2,0.4,0.6,0.8,0.9", "random@0.9")]:
        before = out.read_bytes()
        ran.clear()
        assert main(argv + ["--budget", budgets, "--resume"]) == 0
        assert capsys.readouterr().err == "", "nothing was dropped"
        assert ran == [new], "only the missing configuration ran"
        assert out.read_bytes().startswith(before)
        assert json_lines(out)[-1]["label"] == new
    assert len(json_lines(out)) == 6


def test_a_finished_last_record_without_its_newline_is_kept_and_the_next_starts_a_line(tmp_path):
    out = tmp_path / "r.jsonl"
    first = ResultsFile(out, {"model": "m"})
    first.add({"method": "none", "budget": None, "label": "none"})
    out.write_bytes(out.read_bytes().rstrip(b"\n"))  # e.g. an editor that drops the final newline
    again = ResultsFile(out, {"model": "m"}, resume=True)
    assert again.done("none") is not None, "a complete record is finished"
    again.add({"method": "random", "budget": 0.2, "label": "random@0.2"})
    assert [r["label"] for r in json_lines(out)] == ["none", "random@0.2"]
    assert again.unfinished is None, "nothing was dropped"


def test_a_cut_line_in_the_middle_is_named(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"label": "none", "run": {}}\n{"label": "ran\n{"label": "random@0.2", "run": {}}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl:2: not a JSON record"):
        ResultsFile(out, {}, resume=True)


# ---- row 4: other settings, or a grid that grows -------------------------------------------------------
@pytest.mark.parametrize("first, again, needles", [
    ([], ["--max-new-tokens", "4"], ["--max-new-tokens 2 -> 4"]),
    ([], ["--limit", "3"], ["--limit", "2 -> 3"]),
    ([], ["--metrics", "exact_match"], ["--metrics", "-> exact_match"]),
    ([], ["--model", "tiny"], ["--model", "-> tiny"]),
    (["--method-args", "seed=1"], ["--method-args", "seed=2"], ["--method-args", "random", "seed=1 -> seed=2"]),
    (["--method-args", "seed=1"], [], ["--method-args", "random", "seed=1 -> (defaults)"]),
])
def test_resume_with_other_settings_refuses_before_any_work(tiny_folder, dataset, tmp_path, monkeypatch, capsys,
                                                            first, again, needles):
    folder, _ = tiny_folder
    out = tmp_path / "r.jsonl"
    argv = eval_argv(dataset, folder, out, "--method", "none,random", "--budget", "0.2")
    assert main(argv + first) == 0
    before = out.read_bytes()
    capsys.readouterr()
    forbid_model_loading(monkeypatch)
    # the later flag wins: --limit, --max-new-tokens and --model given again replace the first ones
    assert main(argv + ["--resume", *again]) == 2
    err = one_line(capsys.readouterr().err)
    assert "--resume" in err and str(out) in err
    for needle in needles:
        assert needle in err
    assert out.read_bytes() == before, "the file is untouched"


def test_resume_with_other_data_refuses(tiny_folder, dataset, tmp_path, monkeypatch, capsys):
    import shutil

    folder, _ = tiny_folder
    out = tmp_path / "r.jsonl"
    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    assert main(eval_argv(dataset, folder, out, "--method", "none")) == 0
    before = out.read_bytes()
    capsys.readouterr()
    forbid_model_loading(monkeypatch)
    assert main(eval_argv(other, folder, out, "--method", "none", "--resume")) == 2
    err = one_line(capsys.readouterr().err)
    assert f"--data {dataset.resolve()} -> {other.resolve()}" in err
    assert out.read_bytes() == before


def test_method_options_are_compared_per_method(tmp_path):
    out = tmp_path / "r.jsonl"
    first = ResultsFile(out, {"model": "m", "method_args": {"alpha": "0.5", "fastv.k": "2"}})
    for method, label in [("hired", "hired@0.2"), ("random+fastv", "random+fastv@0.2"), ("none", "none")]:
        first.add({"method": method, "budget": None, "label": label})
    # a new option for a method the file does not hold yet (pdrop); alpha and fastv.k as they were
    again = ResultsFile(out, {"model": "m", "method_args": {"alpha": "0.5", "fastv.k": "2", "pdrop.ratio": "0.4"}},
                        resume=True)
    assert again.differences(["none", "hired", "random+fastv", "pdrop"]) == []
    assert again.done("hired@0.2") is not None and again.done("random+fastv@0.2") is not None
    changed = ResultsFile(out, {"model": "m", "method_args": {"alpha": "0.6", "fastv.k": "2"}}, resume=True)
    assert changed.differences(["none", "hired", "random+fastv"]) == [("method_args hired", {"alpha": "0.5"},
                                                                      {"alpha": "0.6"})]
    assert changed.differences(["none", "random+fastv"]) == [], "hired is not in this grid"
    assert changed.done("hired@0.2") is None and changed.done("none") is not None
    other = ResultsFile(out, {"model": "n", "method_args": {"alpha": "0.5", "fastv.k": "2"}}, resume=True)
    assert other.differences(["none"]) == [("model", "m", "n")], "a run-wide setting counts in every record"


def test_a_grid_that_grows_runs_only_the_missing_configurations(tiny_folder, dataset, tmp_path, ran, capsys):
    folder, _ = tiny_folder
    out = tmp_path / "r.jsonl"
    argv = eval_argv(dataset, folder, out)
    assert main(argv + ["--method", "none,random", "--budget", "0.2"]) == 0
    before = out.read_bytes()
    ran.clear()
    capsys.readouterr()
    # a new method with its own option, a new budget, the table's metric first: the same settings for the
    # configurations already in the file
    assert main(argv + ["--method", "none,random,hired", "--budget", "0.2,0.4", "--method-args", "alpha=0.6",
                        "--metrics", "anls,exact_match,vqa_accuracy,relaxed_accuracy", "--resume"]) == 0
    assert ran == ["random@0.4", "hired@0.2", "hired@0.4"]
    assert out.read_bytes().startswith(before)
    assert [r["label"] for r in json_lines(out)] == ["none", "random@0.2", "random@0.4", "hired@0.2", "hired@0.4"]
    assert "resuming" in capsys.readouterr().out


# ---- a write that fails later in the run -------------------------------------------------------------
def test_a_failed_append_names_the_file_and_keeps_the_finished_records(tiny_folder, dataset, tmp_path, monkeypatch,
                                                                       ran, capsys):
    folder, _ = tiny_folder
    out = tmp_path / "r.jsonl"
    argv = eval_argv(dataset, folder, out, "--method", "none,random", "--budget", "0.2,0.4")
    real_open, appends = open, []

    class DiskFull:
        """The second append writes half its line, then the disk is full."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            if len(appends) == 2:
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def disk_full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "a" not in mode:
            return f
        appends.append(path)
        return DiskFull(f)

    monkeypatch.setattr(results, "open", disk_full_open, raising=False)
    assert main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert str(out) in err and "No space left on device" in err and "random@0.2" in err
    assert [r["label"] for r in json_lines(out)] == ["none"], "the finished record stays, the half line is gone"
    assert ran == ["none", "random@0.2"], "the run stopped at the failed write"

    monkeypatch.delattr(results, "open")
    ran.clear()
    assert main(argv + ["--resume"]) == 0
    assert ran == ["random@0.2", "random@0.4"]
    assert [r["label"] for r in json_lines(out)] == ["none", "random@0.2", "random@0.4"]



def test_a_failed_markdown_write_after_the_grid_names_the_file_and_keeps_the_records(tiny_folder, dataset, tmp_path,
                                                                                     monkeypatch, capsys):
    from pathlib import Path

    folder, _ = tiny_folder
    out, table = tmp_path / "r.jsonl", tmp_path / "t.md"
    real_write = Path.write_text

    def disk_full(self, *args, **kwargs):
        if self == table:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    assert main(eval_argv(dataset, folder, out, "--method", "none", "--markdown", str(table))) == 2
    err = one_line(capsys.readouterr().err)
    assert f"--markdown {table}" in err and "No space left on device" in err and str(out) in err
    assert [r["label"] for r in json_lines(out)] == ["none"]
