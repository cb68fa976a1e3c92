"""`tokendrop serve-bench`: its summary over rounds, its plot and its argument checks (no vLLM needed;
the servers themselves run in tests/serving and in the benchmark of docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from tests.test_cli_errors import one_line_error
from tokendrop.cli import main
from tokendrop.vllm import serve_bench as bench


def record(config, concurrency, round_, rps, ttft, kv=0.1):
    return {"config": config, "round": round_, "concurrency": concurrency, "requests": 4, "wall_s": 4 / rps,
            "requests_per_s": rps, "output_tokens_per_s": 16 * rps, "ttft_ms": ttft, "kv_cache_peak": kv,
            "prompt_tokens": 2951 if config == "none" else 599}


RECORDS = [  # round 1 runs the configurations in rotated order
    record("none", 1, 0, 0.13, 7600), record("none", 8, 0, 0.14, 55000),
    record("hired@0.2", 1, 0, 0.34, 2900), record("hired@0.2", 8, 0, 0.40, 19000),
    record("hired@0.2", 1, 1, 0.32, 3100), record("hired@0.2", 8, 1, 0.42, 21000),
    record("none", 1, 1, 0.12, 8000), record("none", 8, 1, 0.15, 56000),
    record("hired@0.2", 1, 2, 0.33, 3000, kv=0.3), record("hired@0.2", 8, 2, 0.41, 20000),
    record("none", 1, 2, 0.11, 7700), record("none", 8, 2, 0.16, 57000),
]


def test_summary_gives_the_median_and_the_spread_of_the_rounds():
    rows = bench.summary(RECORDS)
    assert [(r["config"], r["concurrency"]) for r in rows] == [("none", 1), ("none", 8), ("hired@0.2", 1),
                                                               ("hired@0.2", 8)]  # first seen
    none1, hired1 = rows[0], rows[2]
    assert none1["rounds"] == 3 and none1["prompt_tokens"] == 2951 and hired1["prompt_tokens"] == 599
    assert none1["requests_per_s"] == 0.12
    assert (none1["requests_per_s_min"], none1["requests_per_s_max"]) == (0.11, 0.13)
    assert (hired1["ttft_ms"], hired1["ttft_ms_min"], hired1["ttft_ms_max"]) == (3000, 2900, 3100)
    assert (hired1["kv_cache_peak"], hired1["kv_cache_peak_max"]) == (0.1, 0.3)
    assert hired1["output_tokens_per_s"] == pytest.approx(16 * 0.33)


def test_summary_of_one_round_has_no_spread():
    rows = bench.summary([r for r in RECORDS if r["round"] == 0])
    assert all(r["rounds"] == 1 and r["ttft_ms_min"] == r["ttft_ms"] == r["ttft_ms_max"] for r in rows)


def test_table_lists_every_row():
    lines = bench.format_table(bench.summary(RECORDS)).splitlines()
    assert lines[0].split() == ["config", "c", "prompt", "req/s", "out", "tok/s", "TTFT", "ms", "KV", "peak"]
    assert lines[3].split() == ["hired@0.2", "1", "599", "0.330", "5.28", "3000", "10.0%"]


def test_plot_draws_the_spread_as_bars(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    drawn = []
    real = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, yerr=None, **kw: (drawn.append((kw["label"], list(y), yerr)),
                                                             real(self, x, y, yerr=yerr, **kw))[1])
    path = tmp_path / "serve.png"
    bench.plot(bench.summary(RECORDS), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    label, ttft_s, (low, high) = drawn[1]  # configuration "none", second panel: TTFT in seconds
    assert label == "none" and ttft_s == pytest.approx([7.7, 56.0])
    assert low == pytest.approx([0.1, 1.0]) and high == pytest.approx([0.3, 1.0])


def test_plot_reads_medians_written_without_a_spread(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{k: v for k, v in r.items() if not k.endswith(("_min", "_max")) and k != "rounds"}
            for r in bench.summary(RECORDS)]
    bench.plot(rows, str(tmp_path / "old.png"))
    assert (tmp_path / "old.png").stat().st_size > 0


@pytest.mark.parametrize("args, needles", [
    (["--configs", "none,hired+pdrop@0.2"], ["--configs", "one pre-LLM method"]),
    (["--configs", "nothing@0.2"], ["--configs", "nothing"]),
    (["--rounds", "0"], ["--rounds"]),
    (["--concurrency", "0"], ["--concurrency"]),
])
def test_bad_arguments_fail_before_any_server_starts(capsys, args, needles):
    assert main(["serve-bench", *args]) == 2
    one_line_error(capsys, *needles)
