"""`scripts/gpu-check` without a GPU and without vLLM: its argument checks, its table, and its comparison
logic with the vLLM engine replaced by a stand-in that answers what the transformers path computes
(the real CPU engine: tests/serving/test_gpu_check.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokendrop.vllm import gpu_check

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check"


@pytest.mark.parametrize("argv, needle", [
    (["--device", "tpu"], "--device must be cuda or cpu, got 'tpu'"),
    (["--device", "cpu", "--models", "bundled,llava"], "--models takes a comma list of bundled, llava-next, qwen2.5-vl"),
    (["--device", "cpu", "--runners", "v3"], "--runners takes a comma list of v2, v1"),
    (["--device", "cpu", "--runners", "v2"], "--runners v2 needs --device cuda"),
    (["--device", "cpu", "--tolerance", "0"], "--tolerance must be a positive number, got 0.0"),
    (["--device", "cpu", "--tolerance", "tiny"], "--tolerance must be a positive number, got 'tiny'"),
    ([], "no CUDA GPU here"),
])
def test_bad_arguments_are_refused_by_name(argv, needle):
    with pytest.raises(gpu_check.UsageError, match=needle.replace("(", r"\(")):
        gpu_check.parse_args(argv, cuda_available=False)


def test_runner_defaults_follow_the_device():
    assert gpu_check.parse_args([], cuda_available=True).runners == ["v2", "v1"]
    assert gpu_check.parse_args(["--device", "cpu"], cuda_available=False).runners == ["v1"]
    assert gpu_check.parse_args(["--device", "cpu"], cuda_available=False).models == list(gpu_check.MODELS)


def test_the_script_refuses_in_one_line_without_cuda():
    if gpu_check.has_cuda():
        pytest.skip("this machine has a CUDA GPU")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gpu-check: error: no CUDA GPU here")


class FakeEngine:
    """Stands in for the vLLM process: the transformers path's top-5 first-token logprobs and prompt
    lengths for the job's model, optionally spoiled (`shift` on one logprob, `extra` prompt tokens, another
    runner reported, or a failure)."""

    def __init__(self, shift=0.0, extra=0, runner=None, fail=False):
        self.shift, self.extra, self.runner, self.fail, self.jobs = shift, extra, runner, fail, []

    def __call__(self, job, log_path):
        self.jobs.append(job)
        if self.fail:
            raise RuntimeError("the vLLM process failed (exit code 1): CUDA error")
        model, processor = gpu_check.build_model(job.model)
        results = {}
        for label, _ in job.configs:
            method = gpu_check.method_of(label)
            answers = []
            for length, logprobs in gpu_check.transformers_path(model, processor, method, job.prompt, job.images, "cpu"):
                top = logprobs.topk(5)
                answers.append((length + self.extra, {int(t): float(v) for t, v in zip(top.indices, top.values)}))
            token = next(iter(answers[-1][1]))
            answers[-1][1][token] += self.shift
            results[label] = answers
        return {"runner": self.runner or job.runner, "results": results}


MODELS = {"llava-next": ("none", "hired@0.3")}


def test_rows_pass_when_vllm_answers_what_transformers_computes(tmp_path):
    engine = FakeEngine()
    rows = gpu_check.check(MODELS, ["v1"], "cpu", 1e-4, tmp_path, engine=engine, progress=lambda line: None)
    assert [(r["model"], r["runner"], r["config"], r["pass"]) for r in rows] == [
        ("llava-next", "v1", "none", True), ("llava-next", "v1", "hired@0.3", True)]
    none, hired = rows
    assert hired["lengths"] == hired["reference_lengths"] and all(h < n for h, n in zip(hired["lengths"], none["lengths"]))
    assert hired["max_dlogprob"] == pytest.approx(0.0, abs=1e-6)
    job, = engine.jobs  # one process per model and runner, every configuration in it
    assert job.configs[0] == ("none", None) and job.configs[1][1]["architectures"] == [
        "TokendropLlavaNextForConditionalGeneration"]
    assert len(job.images) == len(gpu_check.IMAGE_SIZES) and "<image>" in job.prompt


@pytest.mark.parametrize("engine, error", [
    (FakeEngine(shift=1e-3), "|dlogprob| >= 0.0001"),
    (FakeEngine(extra=1), "prompt lengths differ"),
    (FakeEngine(runner="v1"), "vLLM ran Model Runner v1, not v2"),
    (FakeEngine(fail=True), "the vLLM process failed (exit code 1): CUDA error"),
])
def test_rows_fail_with_the_reason(tmp_path, engine, error):
    rows = gpu_check.check({"llava-next": ("hired@0.3",)}, ["v2"], "cpu", 1e-4, tmp_path, engine=engine,
                           progress=lambda line: None)
    (row,) = rows
    assert not row["pass"] and row["error"] == error
    assert gpu_check.format_row(row).endswith(f"FAIL: {error}")


def test_an_engine_error_for_one_configuration_fails_that_row_only(tmp_path):
    def engine(job, log_path):
        answer = FakeEngine()(job, log_path)
        answer["results"]["none"] = "ValueError: the model could not be loaded"
        return answer

    rows = gpu_check.check(MODELS, ["v1"], "cpu", 1e-4, tmp_path, engine=engine, progress=lambda line: None)
    assert [r["pass"] for r in rows] == [False, True]
    assert rows[0]["error"] == "ValueError: the model could not be loaded"


def test_table():
    rows = [{"model": "bundled", "runner": "v2", "config": "hired@0.2", "lengths": [71, 71], "reference_lengths": [71, 71],
             "max_dlogprob": 2.5e-6, "pass": True, "error": None},
            {"model": "qwen2.5-vl", "runner": "v1", "config": "none", "lengths": None, "reference_lengths": [40, 36],
             "max_dlogprob": None, "pass": False, "error": "OSError: no video processor"}]
    lines = gpu_check.format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["model", "runner", "config"]
    assert lines[1].split() == ["bundled", "v2", "hired@0.2", "[71,", "71]", "/", "[71,", "71]", "2.5e-06", "pass"]
    assert lines[2].split()[:7] == ["qwen2.5-vl", "v1", "none", "-", "/", "[40,", "36]"]
    assert lines[2].endswith("FAIL: OSError: no video processor")
    assert lines[3] == "1 of 2 rows pass"
