"""The measured benchmark on a tiny model, its CLI errors, and the method registry it shares."""

from __future__ import annotations

import json

import pytest
import torch

import tokendrop as td
from tokendrop import bench
from tokendrop.cli import main
from tokendrop.registry import VANILLA, build_methods, method_names, needs_budget

RECORD_FIELDS = {
    "method", "budget", "batch", "image_size", "repeats", "visual_tokens", "analytic_visual_tokens", "text_tokens",
    "layer_image_tokens", "equivalent_tokens", "vision_ms", "prefill_ms", "decode_ms", "e2e_ms", "tokens_per_s",
    "peak_mem_bytes", "kv_cache_bytes", "prefill_flops", "llm_prefill_flops", "vision_flops", "scoring_flops",
    "decode_flops_per_token", "pdrop_tflops", "fastv_gflops_per_layer", "device", "dtype", "attn_implementation",
}


# ---- registry -------------------------------------------------------------------------------------------
def test_registry_builds_every_name():
    assert build_methods("none") == ()
    assert build_methods("hired", budget=0.2) == (td.HiRED(budget=0.2, alpha=0.5),)
    assert build_methods("hired-official", budget=0.2)[0].variant == "official"
    assert build_methods("HiRED+PDrop", budget=0.4, ratio=0.6) == (td.HiRED(budget=0.4), td.PyramidDrop(ratio=0.6))
    assert build_methods("fastv", k=3, drop=0.75) == (td.FastV(k=3, drop=0.75),)
    assert isinstance(build_methods("random", budget=0.3)[0], td.RandomDrop)
    assert isinstance(build_methods("spatial", budget=0.3)[0], td.SpatialDrop)
    assert needs_budget("spatial+fastv") and not needs_budget("pdrop") and not needs_budget("base-only")
    assert build_methods("base-only+pdrop") == (td.BaseOnly(), td.PyramidDrop())
    assert {VANILLA, *method_names()} == {"none", "hired", "hired-official", "random", "spatial", "base-only", "pdrop", "fastv", "dominant",
                                          "fastervlm", "hiprune", "dart", "divprune", "vispruner", "visionzip",
                                          "cdpruner"}


@pytest.mark.parametrize("name, kwargs, message", [
    ("hird", {"budget": 0.2}, "Did you mean 'hired'"),
    ("fast-v", {}, "Did you mean 'fastv'"),
    ("hired", {}, "needs a budget"),
    ("hired+spatial", {"budget": 0.2}, "at most one pre-LLM"),
    ("pdrop+fastv", {}, "at most one pre-LLM"),
    ("none+pdrop", {}, "cannot be composed"),
    ("", {}, "non-empty"),
    ("hired", {"budget": 1.5}, "budget must be in (0, 1]"),
])
def test_registry_errors_name_the_problem(name, kwargs, message):
    with pytest.raises(ValueError, match=None) as err:
        build_methods(name, **kwargs)
    assert message in str(err.value)
    if "Did you mean" in message:
        assert "Available: none, hired" in str(err.value)


def test_a_control_is_a_name_of_its_own_run_alone_at_each_budget(capsys):
    from tokendrop.families.gemma4.control import SoftTokenBudget
    from tokendrop.registry import build_run, configurations, control_names

    assert control_names() == {"gemma4-budget": "gemma4"}
    assert build_run("gemma4-budget", budget=0.25, alpha=0.6) == SoftTokenBudget(budget=0.25)  # grid options skip it
    assert build_run("hired", budget=0.2) == build_methods("hired", budget=0.2)
    assert configurations(["none", "gemma4-budget"], [0.25, 0.5]) == [("none", None), ("gemma4-budget", 0.25),
                                                                     ("gemma4-budget", 0.5)]
    for name, message in (("gemma4-budget+pdrop", "'gemma4-budget' is a control (the stock model at its own setting), "
                                                  "run alone: it cannot be composed"),
                          ("gemma4-budget", "'gemma4-budget' is a control")):
        with pytest.raises(ValueError, match=None) as err:
            build_methods(name, budget=0.25)
        assert message in str(err.value)
    with pytest.raises(ValueError, match="Did you mean 'gemma4-budget'"):
        build_run("gemma4-budgt", budget=0.25)
    assert main(["methods"]) == 0
    assert "  gemma4-budget: gemma4 only. The stock Gemma 4 at its own `max_soft_tokens`" in capsys.readouterr().out


def test_a_control_on_a_family_without_it_is_refused_in_one_line(tiny_folder, next_model, capsys):
    from tokendrop import controls
    from tokendrop.registry import build_run

    folder, _ = tiny_folder
    assert main(["bench", "--model", str(folder), "--method", "none,gemma4-budget", "--budget", "0.25"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tokendrop bench: error: --method gemma4-budget: control 'gemma4-budget' is gemma4's own setting and runs on gemma4 "
        "models only; this model is llava-next: it declares no control")
    model, processor = next_model
    with pytest.raises(ValueError, match="runs on gemma4 models only; this model is llava-next"):
        with controls.applied(model, processor, build_run("gemma4-budget", budget=0.25)):
            pass


# ---- measuring ------------------------------------------------------------------------------------------
def test_peak_memory_sees_a_temporary_allocation():
    with bench.PeakMemory(torch.device("cpu")) as memory:
        x = torch.ones(40_000_000)  # 160 MB, touched
        x.add_(1)
        del x
    assert memory.peak > 100 * 2**20


def test_tiny_bench_writes_json_with_every_field_and_a_png(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--method", "none,hired,spatial,pdrop,fastv", "--budget", "0.2,0.5", "--batch", "1,2",
                 "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--json", str(out), "--plot", str(png), "--no-progress"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "tiny_llava_next()" in stdout or "from_pretrained" in stdout  # says which model ran
    assert "prefill ms" in stdout and "against the stock model" in stdout
    records = json.loads(out.read_text())
    assert len(records) == 2 * (1 + 2 + 2 + 1 + 1)  # batches x (none, hired x2, spatial x2, pdrop, fastv)
    for r in records:
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert r["visual_tokens"] == r["analytic_visual_tokens"]
        assert r["prefill_ms"] >= r["vision_ms"] > 0 and r["decode_ms"] > 0 and r["new_tokens"] == 2
        assert r["kv_cache_bytes"] > 0 and r["peak_mem_bytes"] >= 0
    van = next(r for r in records if r["method"] == "none" and r["batch"] == 1)
    pdrop = next(r for r in records if r["method"] == "pdrop" and r["batch"] == 1)
    assert pdrop["equivalent_tokens"] < van["equivalent_tokens"] == van["visual_tokens"]
    # KV bytes follow the tokens each layer keeps: bytes per cached token is the same for every method.
    per_token = {r["kv_cache_bytes"] / bench.cached_tokens(r) for r in records}
    assert len(per_token) == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--arch", "llava-next-7b"], "unknown arch"),
    (["--image-size", "224"], "--image-size"),
    (["--image-size", "224x-3"], "--image-size"),
    (["--method", ""], "--method"),
    (["--method", "hired,pyramid"], "unknown method 'pyramid'"),
    (["--budget", "0"], "(0, 1]"),
    (["--budget", "0.2,2"], "(0, 1]"),
    (["--batch", "0"], "--batch"),
    (["--repeats", "x"], "--repeats"),
    (["--plot", "out.jpg"], "--plot"),
    (["--layers", "2"], "--layers"),
    (["--method", "hired", "--method-args", "ratio=0.5"], "'ratio' is not an option of hired"),
    (["--method", "pdrop", "--method-args", "layers=[2,x]"], "layers"),
    (["--model", "m", "--arch", "llava-1.5-7b"], "either --model or --arch"),
])
def test_bench_cli_bad_arguments_exit_2(capsys, argv, message):
    assert main(["bench", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_comparisons_carry_their_spread_and_flag_what_they_cannot_tell():
    def rec(method, budget, prefill, spread, batch=1, repeats=3):
        r = {"method": method, "budget": budget, "batch": batch, "image_size": [224, 224], "repeats": repeats,
             "kv_cache_bytes": 100 if method == "none" else 25}
        for key, value, half in (("prefill_ms", prefill, spread), ("decode_ms", 10.0, 1.0), ("tokens_per_s", 5.0, 0.5)):
            r[key], r[key + "_min"], r[key + "_max"] = value, value - half, value + half
        return r

    records = [rec("none", None, 100, 5), rec("hired", 0.2, 40, 5), rec("spatial", 0.2, 95, 10)]
    rows = {row["label"]: row for row in bench.comparisons(records, warmup=1)}
    hired = rows["hired@0.2"]["figures"]["prefill"]
    assert hired["ratio"] == pytest.approx(100 / 40)
    assert hired["low"] == pytest.approx(95 / 45) and hired["high"] == pytest.approx(105 / 35)
    assert rows["hired@0.2"]["figures"]["KV bytes"]["ratio"] == 0.25
    assert "prefill: spread larger than the effect" not in rows["hired@0.2"]["flags"]
    assert "prefill: spread larger than the effect" in rows["spatial@0.2"]["flags"]  # 95 +- 10 against 100 +- 5
    assert "decode: spread larger than the effect" in rows["hired@0.2"]["flags"]  # equal decode times
    cold = bench.comparisons(records, warmup=0)
    assert all("no warm-up: the first runs paid the cold start" in row["flags"] for row in cold)
    text = bench.format_comparisons(cold)
    assert "hired@0.2 vs none (batch 1, 224x224): prefill 2.50x [2.11-3.00]" in text
    assert "MET" not in text and "target" not in text
