"""`tokendrop serve-bench`: its summary over rounds, the saturation rule, the comparison with stock and
the cost model, the table, its plot and its argument checks (no vLLM needed; the servers themselves run
in tests/serving and in the benchmark of docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from tests.test_cli_errors import one_line_error
from tokendrop.cli import main
from tokendrop.loading import save_hub_layout
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
    assert lines[0].split() == ["config", "c", "prompt", "req/s", "out", "tok/s", "TTFT", "p50", "p95", "ms", "KV",
                                "peak", "speedup", "ideal", "of", "ideal", "note"]
    # records written before the p95 and the comparison: those columns read "-"
    assert lines[3].split() == ["hired@0.2", "1", "599", "0.330", "5.28", "3000", "-", "10.0%", "-", "-", "-"]


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


METRICS = """# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.75
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 3.0
vllm:num_preemptions_total{engine="0",model_name="m"} 2.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="1000",prefix_caching="True"} 1.0
"""


def test_metrics_are_read_from_the_prometheus_page():
    assert bench.parse_metrics(METRICS) == {"kv_usage": 0.75, "waiting": 3.0, "preemptions": 2.0,
                                            "cache_tokens": 16000}
    assert bench.parse_metrics("")["cache_tokens"] is None


def test_the_cache_is_full_when_a_waiting_request_does_not_fit():
    sample = bench.parse_metrics(METRICS)  # 25% of 16000 tokens free: 4000
    assert bench.cache_full(sample, request_tokens=4001)
    assert not bench.cache_full(sample, request_tokens=4000)  # it fits: the requests wait for compute, not cache
    assert not bench.cache_full({**sample, "waiting": 0.0}, request_tokens=4001)
    assert not bench.cache_full({**sample, "cache_tokens": None}, request_tokens=4001)


def test_a_preemption_during_the_level_fills_the_cache():
    watch = bench.CacheWatch("http://127.0.0.1:1", request_tokens=10)
    watch.preemptions = 2.0  # counted when the level started
    sample = {**bench.parse_metrics(METRICS), "waiting": 0.0}
    watch.sample(sample)
    assert not watch.full and watch.peak == 0.75
    watch.sample({**sample, "preemptions": 3.0, "kv_usage": 0.5})
    assert watch.full and watch.peak == 0.75


def test_percentile_interpolates_between_sorted_values():
    assert bench.percentile([5, 1, 4, 2, 3], 0.95) == pytest.approx(4.8)  # position 3.8: 4 + 0.8
    assert bench.percentile([5, 1, 4, 2, 3], 0.5) == 3
    assert bench.percentile([7.0], 0.95) == 7.0


def test_level_figures():
    results = [{"ttft_s": t, "prompt_tokens": 100, "completion_tokens": 16} for t in (0.1, 0.2, 0.3, 0.4)]
    level = bench.level_figures(results, wall=2.0, concurrency=4)
    assert level["requests_per_s"] == 2.0 and level["output_tokens_per_s"] == 32.0
    assert level["ttft_ms"] == pytest.approx(250) and level["ttft_p95_ms"] == pytest.approx(385)


def test_the_sweep_of_a_configuration_stops_at_the_level_that_fills_the_cache(monkeypatch, tmp_path):
    from contextlib import contextmanager

    @contextmanager
    def fake_server(folder, method, vllm_args, log_path):
        yield f"http://{method}"

    full_at = {"stock": 4, "small": None}  # the stock server fills its cache at concurrency 4
    seen = []

    def fake_level(url, images, concurrency, max_tokens, request_tokens):
        seen.append((url, len(images), request_tokens))
        return {"concurrency": concurrency, "requests": len(images), "requests_per_s": 1.0, "output_tokens_per_s": 16.0,
                "ttft_ms": 10.0, "ttft_p95_ms": 12.0, "kv_cache_peak": 0.5, "prompt_tokens": 100,
                "kv_full": concurrency == full_at[url[7:]]}

    monkeypatch.setattr(bench, "server", fake_server)
    monkeypatch.setattr(bench, "served_model", lambda url: "m")
    monkeypatch.setattr(bench, "chat_request", lambda url, model, image, max_tokens: {"prompt_tokens": 100})
    monkeypatch.setattr(bench, "load_level", fake_level)
    monkeypatch.setattr(bench, "image_url", str)
    lines = []
    records = bench.run("folder", [("none", "stock"), ("hired@0.2", "small")], [(1, 2), (4, 4), (16, 16)],
                        lambda seed: seed, max_tokens=16, vllm_args=[], rounds=1, log_dir=tmp_path,
                        progress=lines.append)
    assert [(r["config"], r["concurrency"]) for r in records] == [("none", 1), ("none", 4), ("hired@0.2", 1),
                                                                  ("hired@0.2", 4), ("hired@0.2", 16)]
    assert "none: the KV cache filled at concurrency 4; higher levels skipped" in lines
    assert {tokens for _, _, tokens in seen} == {116}  # the warm-up request's prompt + max_tokens


def test_summary_says_when_any_round_filled_the_cache():
    records = [{**r, "kv_full": r["round"] == 1 and r["concurrency"] == 8} for r in RECORDS]
    rows = bench.summary(records)
    assert [r["kv_full"] for r in rows] == [False, True, False, True]


COSTS = {"none": {"visual_tokens": 2880, "prompt_tokens": 2951, "prefill_flops": 10e12},
         "hired@0.2": {"visual_tokens": 576, "prompt_tokens": 599, "prefill_flops": 2.5e12}}


def test_comparison_with_stock_at_the_same_level():
    rows = bench.compare_with_stock(bench.summary(RECORDS), COSTS)
    stock1, stock8, hired1, hired8 = rows
    assert (stock1["speedup"], stock1["ideal_speedup"], stock1["fraction_of_ideal"]) == (1.0, 1.0, 1.0)
    assert hired1["speedup"] == pytest.approx(0.33 / 0.12) and hired1["ideal_speedup"] == 4.0
    assert hired1["fraction_of_ideal"] == pytest.approx(0.33 / 0.12 / 4.0)
    assert hired8["speedup"] == pytest.approx(0.41 / 0.15)
    assert not any(r["slower_than_stock"] for r in rows)


def test_a_level_without_stock_or_costs_is_not_compared():
    rows = bench.summary(RECORDS) + [{**bench.summary(RECORDS)[3], "concurrency": 64}]
    hired64 = bench.compare_with_stock(rows, COSTS)[-1]
    assert hired64["speedup"] is None and hired64["fraction_of_ideal"] is None and hired64["ideal_speedup"] == 4.0
    assert not hired64["slower_than_stock"]
    assert bench.compare_with_stock(rows, {})[2]["ideal_speedup"] is None


def test_a_level_slower_than_stock_is_marked_and_warned_about():
    records = [{**r, "requests_per_s": 0.1} if r["config"] == "hired@0.2" and r["concurrency"] == 8 else r
               for r in RECORDS]
    rows = bench.compare_with_stock(bench.summary(records), COSTS)
    assert [r["slower_than_stock"] for r in rows] == [False, False, False, True]
    assert bench.format_row(rows[3]).endswith("SLOWER than stock")
    assert "SLOWER" not in bench.format_row(rows[2])
    assert bench.warnings(rows, COSTS) == ["warning: hired@0.2 serves 0.100 req/s at concurrency 8, fewer than "
                                           "stock (0.150)"]
    full = bench.format_row({**rows[3], "kv_full": True})
    assert full.endswith("SLOWER than stock, KV full")
    assert full.split()[8:11] == ["0.67", "4.00", "17%"]  # speedup 0.1 / 0.15, ideal, fraction


def test_a_prompt_length_the_cost_model_does_not_predict_is_warned_about():
    costs = {**COSTS, "hired@0.2": {**COSTS["hired@0.2"], "prompt_tokens": 600}}
    rows = bench.compare_with_stock(bench.summary(RECORDS), costs)
    assert bench.warnings(rows, costs) == ["warning: hired@0.2: the server counts 599 prompt tokens, the cost "
                                           "model 600"]


@pytest.fixture(scope="module")
def saved_next(tmp_path_factory):
    """A tiny LLaVA-NeXT saved for vLLM, and its processor in memory."""
    from tokendrop.tiny import tiny_llava_next

    model, processor = tiny_llava_next(text_layers=1)
    processor.chat_template = bench.CHAT_TEMPLATE
    return save_hub_layout(model, processor, tmp_path_factory.mktemp("next")), model, processor


def prompt_length(model, processor, image, method) -> int:
    """The transformers path's prompt length for the benchmark's chat message."""
    import tokendrop as td

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": bench.QUESTION}]}]
    with td.apply(model, processor, *([method] if method else [])):
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        return processor(images=image, text=text, return_tensors="pt")["input_ids"].shape[1]


def test_prefill_costs_predict_the_prompt_lengths_of_the_transformers_path(saved_next):
    import tokendrop as td
    from tokendrop.bench import test_image

    folder, model, processor = saved_next
    image = test_image(200, 300)
    configs = [("none", None), ("hired@0.2", td.HiRED(0.2)), ("spatial@0.4", td.SpatialDrop(0.4))]
    predicted = bench.PrefillCosts(str(folder), (200, 300)).predict(configs, prompt_length(model, processor, image, None))
    for label, method in configs:
        assert predicted[label]["prompt_tokens"] == prompt_length(model, processor, image, method), label
    flops = [predicted[label]["prefill_flops"] for label, _ in configs]
    assert flops[0] > flops[2] > flops[1]  # fewer tokens, less prefill


def test_a_saved_model_is_served_with_its_own_context_length(saved_next):
    folder, model, _ = saved_next
    expected = min(bench.MAX_MODEL_LEN, model.config.text_config.max_position_embeddings)
    assert bench.vllm_args_for(folder) == ["--max-model-len", str(expected)]
    assert not bench.add_video_processor(folder, "llava_next")  # LLaVA-NeXT's processor has no video processor
    assert not (folder / "video_stub.py").exists()


def test_a_qwen_model_gets_the_video_stand_in_without_torchvision(tmp_path):
    import importlib.util

    from tokendrop.tiny import tiny_qwen2_5_vl

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the stock video processor is saved instead")
    tiny_qwen2_5_vl(text_layers=1)[0].config.save_pretrained(tmp_path)
    assert bench.add_video_processor(tmp_path, "qwen2_5_vl")
    assert (tmp_path / "video_stub.py").read_text() == bench.VIDEO_STUB
    assert bench.vllm_args_for(tmp_path)[-1] == "--trust-remote-code"
