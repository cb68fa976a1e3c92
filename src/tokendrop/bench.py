"""Measured benchmark: methods x budgets x batch sizes x image sizes on one model, timed honestly.

Every configuration runs the stock `model.generate()` (greedy, a fixed number of new tokens) with
the method applied by `tokendrop.apply`, and records:
  vision_ms    wall time of `get_image_features` (tower + any scoring + projector + packing),
  prefill_ms   time to first token: from generate() entry to the first logits (vision included),
  decode_ms    per token, mean gap between later logits,
  e2e_ms / tokens_per_s   the whole generate() call, batch * new tokens / seconds,
  peak_mem_bytes   CUDA: max allocated minus allocated before; CPU: peak RSS sampled every
               `RSS_INTERVAL` s in a thread (/proc/self/statm) minus RSS before the call,
  kv_cache_bytes   bytes of the cache generate() returns (keys + values, every layer),
plus the analytic figures of `tokendrop.cost.method_cost` for the same token counts.
A control (a family's own setting for fewer visual tokens, `tokendrop.controls`) runs the stock model
with that setting; its record says so under "control" (e.g. "max_soft_tokens=70"; None otherwise).
Warm-up rounds are excluded; configurations are interleaved round-robin (order rotated every
repeat) so slow drifts of a shared machine hit all of them; medians and min / max are reported.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from tokendrop import compat, controls, cost
from tokendrop.families.base import Control, resolve
from tokendrop.registry import build_run, check_options, configurations, family_for, family_of

RSS_INTERVAL = 0.002
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
TIMED = ("vision_ms", "prefill_ms", "decode_ms", "e2e_ms", "tokens_per_s", "peak_mem_bytes", "preprocess_ms")
QUESTION = "Describe the image in detail."  # in the model's own prompt format (`loading.format_prompt`)


# ---- models --------------------------------------------------------------------------------------
def load_bench_model(model: str | None = None, arch: str | None = None, layers: int | None = None,
               vision_layers: int | None = None, seed: int = 0):
    """(model, processor, description) for `--model`, `--arch [--layers]`, or the bundled default."""
    if model is not None and arch is not None:
        raise ValueError("give either model or arch, not both")
    if arch is not None:
        return _arch_model(arch, layers, vision_layers, seed)
    if layers is not None or vision_layers is not None:
        raise ValueError("layers / vision_layers only apply with arch")
    from tokendrop.loading import load_default

    loaded, processor, note = load_default(model, seed=seed)
    return loaded, processor, note or f"from_pretrained({model!r})"


def _arch_model(arch: str, layers, vision_layers, seed):
    """Random weights with the arch's real widths; `tiny_tokenizer` ids (vocab size kept)."""
    spec = cost.load_arch(arch)
    config = cost.arch_config(spec, layers, vision_layers)
    family = family_of(config.model_type)
    tokenizer = resolve(family.tokenizer)()
    family.bind_tokenizer(config, tokenizer)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = resolve(family.model_classes[0])(config).to(torch.float32).eval()
    vision = config.vision_config
    depth = getattr(vision, "num_hidden_layers", None) or vision.depth
    what = f"{arch} shapes, random weights, {config.text_config.num_hidden_layers} LLM layers, {depth} vision layers"
    return model, cost.arch_processor(spec, tokenizer), what


def default_image_size(model) -> tuple[int, int]:
    """A 2x2-grid image for tiling models (two tiles a side), one tile otherwise; 672 x 672 pixels
    for native-resolution models (Qwen-VL: 576 tokens, as a LLaVA-1.5 image)."""
    tile = getattr(model.config.vision_config, "image_size", None)
    if tile is None:
        return (672, 672)
    tiles = family_for(model).layout((2 * tile, 2 * tile)).num_tiles
    return (2 * tile, 2 * tile) if tiles else (tile, tile)


def test_image(height: int, width: int, seed: int = 0):
    """A deterministic image with structure (smooth gradients plus blocks), not plain noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    pixels = np.stack([np.sin(6 * x), np.cos(5 * y), np.sin(4 * (x + y))], axis=-1) * 80 + 128
    for _ in range(6):
        top, left = rng.integers(0, height), rng.integers(0, width)
        pixels[top : top + height // 5, left : left + width // 5] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


# ---- measuring one call ---------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of a block, above what was in use when it started (see module docstring)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE_SIZE

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, self.rss())
            time.sleep(RSS_INTERVAL)

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._max = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self.rss()) - self._base


class LogitTimes:
    """A logits processor that only records when each new token's logits are ready."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def _timed(fn, sink: list, cuda: bool):
    """`fn` wrapped to append its wall time (seconds) to `sink`; signature kept for generate()."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        sink.append(time.perf_counter() - start)
        return out

    return wrapper


def cache_bytes(cache) -> int:
    """Bytes held by a DynamicCache's keys and values (every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def timing_vision(model, sink: list, cuda: bool):
    """Time every `get_image_features` call (whatever is installed, tokendrop's or stock) into `sink`."""
    base = model.model
    had_own = "get_image_features" in vars(base)
    inner = base.get_image_features
    base.get_image_features = _timed(inner, sink, cuda)
    try:
        yield
    finally:
        if had_own:
            base.get_image_features = inner
        else:
            del base.get_image_features


def measure(model, processor, methods, images, prompts, new_tokens: int) -> dict:
    """One generate() call under `methods` (a tuple of methods, or a control: `registry.build_run`):
    timings, memory, token counts (see module docstring)."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    vision_times: list[float] = []
    with controls.applied(model, processor, methods) as handle:
        with timing_vision(model, vision_times, device.type == "cuda"):
            start = time.perf_counter()
            # one list of images per prompt (a flat list is one prompt's images to Gemma 4's processor)
            inputs = processor(images=[[image] for image in images], text=prompts, return_tensors="pt",
                               padding=True).to(device)
            preprocess = time.perf_counter() - start
            logits = LogitTimes(device)
            with PeakMemory(device) as memory, torch.inference_mode():
                start = time.perf_counter()
                out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     logits_processor=LogitsProcessorList([logits]), return_dict_in_generate=True,
                                     pad_token_id=processor.tokenizer.pad_token_id)
                end = time.perf_counter()
        layer_tokens = None if handle.layer_tokens is None else handle.layer_tokens[0].tolist()
    image_tokens = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    batch, steps = inputs["input_ids"].shape[0], len(logits.times)
    return {
        "visual_tokens": image_tokens,
        "text_tokens": int(inputs["input_ids"].shape[1]) - image_tokens,
        "layer_image_tokens": layer_tokens,
        "new_tokens": steps,
        "preprocess_ms": 1e3 * preprocess,
        "vision_ms": 1e3 * sum(vision_times),
        "prefill_ms": 1e3 * (logits.times[0] - start),
        "decode_ms": 1e3 * (logits.times[-1] - logits.times[0]) / max(steps - 1, 1),
        "e2e_ms": 1e3 * (end - start),
        "tokens_per_s": batch * steps / (end - start),
        "peak_mem_bytes": memory.peak,
        "kv_cache_bytes": cache_bytes(compat.output_cache(out)),
    }


# ---- the grid --------------------------------------------------------------------------------------
@dataclass
class Grid:
    """What to run. Method names are `tokendrop.registry` names; budgets apply to pre-LLM methods."""

    methods: list[str]
    budgets: list[float] = field(default_factory=lambda: [0.2])
    batches: list[int] = field(default_factory=lambda: [1])
    image_sizes: list[tuple[int, int]] | None = None
    repeats: int = 3
    warmup: int = 1
    new_tokens: int = 8
    options: dict = field(default_factory=dict)  # method options (dataclass fields) for build_methods

    def __post_init__(self):
        if not self.methods:
            raise ValueError("methods must name at least one method, e.g. ['none', 'hired']")
        for name, value, low in (("repeats", self.repeats, 1), ("warmup", self.warmup, 0), ("new_tokens", self.new_tokens, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batches) or not self.batches:
            raise ValueError(f"batches must be positive ints, got {self.batches!r}")

    def configs(self) -> list[tuple[str, float | None]]:
        """(method name, budget or None) pairs: a budget only for methods with a pre-LLM part (and controls)."""
        out = configurations(self.methods, self.budgets)
        check_options(self.methods, self.options)
        for name, budget in out:
            build_run(name, budget=budget, **self.options)  # validate everything before running
        return out


def run_grid(model, processor, grid: Grid, progress: bool = True) -> list[dict]:
    """Run every configuration `grid.warmup + grid.repeats` times, interleaved; one record per configuration."""
    from tqdm import tqdm

    from tokendrop.loading import format_prompt

    prompt = format_prompt(processor, QUESTION)
    sizes = grid.image_sizes or [default_image_size(model)]
    configs = grid.configs()
    total = len(sizes) * len(grid.batches) * (grid.warmup + grid.repeats) * len(configs)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress)
    records = []
    for size in sizes:
        image = test_image(*size)
        for batch in grid.batches:
            samples = {c: [] for c in configs}
            for rep in range(grid.warmup + grid.repeats):
                shift = rep % len(configs)
                for name, budget in configs[shift:] + configs[:shift]:  # rotated round-robin
                    bar.set_postfix_str(f"{name} b={budget} B={batch} {size[0]}x{size[1]}")
                    methods = build_run(name, budget=budget, **grid.options)
                    result = measure(model, processor, methods, [image] * batch, [prompt] * batch, grid.new_tokens)
                    if rep >= grid.warmup:
                        samples[(name, budget)].append(result)
                    bar.update()
            records += [_record(model, processor, name, budget, batch, size, runs, grid)
                        for (name, budget), runs in samples.items()]
    bar.close()
    return records


def _record(model, processor, name, budget, batch, size, runs: list[dict], grid: Grid) -> dict:
    """Medians and spread of the runs of one configuration, plus its analytic costs."""
    first = runs[0]
    run = build_run(name, budget=budget, **grid.options)
    dtype = next(model.parameters()).dtype
    analytic = _analytic(model, processor, run, size, first["text_tokens"], batch, dtype)
    record = {"method": name, "budget": budget, "control": controls.describe(processor, run), "batch": batch,
              "image_size": list(size), "repeats": len(runs),
              "new_tokens": first["new_tokens"], "visual_tokens": first["visual_tokens"],
              "analytic_visual_tokens": analytic["visual_tokens"], "text_tokens": first["text_tokens"],
              "layer_image_tokens": first["layer_image_tokens"] or analytic["layer_image_tokens"],
              "kv_cache_bytes": first["kv_cache_bytes"]}
    record["equivalent_tokens"] = sum(record["layer_image_tokens"]) / len(record["layer_image_tokens"])
    for key in TIMED:
        values = [r[key] for r in runs]
        record[key] = statistics.median(values)
        record[key + "_min"], record[key + "_max"] = min(values), max(values)
    for key in ("pdrop_tflops", "fastv_gflops_per_layer", "vision_flops", "scoring_flops", "llm_prefill_flops",
                "prefill_flops", "decode_flops_per_token"):
        record[key] = analytic[key]
    record["kv_cache_bytes_analytic_prefill"] = analytic["kv_cache_bytes"]
    record.update(device=str(next(model.parameters()).device), dtype=str(dtype).replace("torch.", ""),
                  attn_implementation=model.config._attn_implementation, threads=torch.get_num_threads())
    return record


def _analytic(model, processor, run, size, text_tokens, batch, dtype) -> dict:
    """`cost.method_cost` of a configuration; a control's is the stock model's at the control's setting."""
    bytes_per_element = torch.empty((), dtype=dtype).element_size()
    if not isinstance(run, Control):
        return cost.method_cost(model, run, size, text_tokens=text_tokens, batch=batch, bytes_per_element=bytes_per_element)
    with run.applied(processor):  # the processor's geometry at the control's setting
        return cost.method_cost(model, (), size, text_tokens=text_tokens, batch=batch, bytes_per_element=bytes_per_element,
                                processor=processor)


# ---- comparisons -----------------------------------------------------------------------------------
COMPARED = (("prefill_ms", "prefill", True), ("decode_ms", "decode", True), ("tokens_per_s", "tokens/s", False))


def _find(records, method, batch, size, budget=None):
    for r in records:
        if r["method"] == method and r["batch"] == batch and r["image_size"] == list(size) and (budget is None or r["budget"] == budget):
            return r
    return None


def comparisons(records: list[dict], warmup: int) -> list[dict]:
    """Every configuration against the stock model ("none") at the same batch and image size.

    Each figure is a ratio of medians, oriented so that > 1 is better (time: stock / method,
    throughput: method / stock), with the range its runs allow (worst min-max pairing). A ratio
    whose range contains 1 is flagged: its spread is larger than its effect. Without warm-up the
    first configuration paid the cold start, so the whole run is flagged.
    """
    out = []
    for r in records:
        van = _find(records, "none", r["batch"], r["image_size"])
        if van is None or r is van:
            continue
        row = {"label": _label(r), "batch": r["batch"], "image_size": r["image_size"], "figures": {}, "flags": []}
        for key, what, lower_is_better in COMPARED:
            num, den = (van, r) if lower_is_better else (r, van)
            ratio = num[key] / den[key]
            low, high = num[key + "_min"] / den[key + "_max"], num[key + "_max"] / den[key + "_min"]
            row["figures"][what] = {"ratio": ratio, "low": low, "high": high}
            if low <= 1.0 <= high and r["repeats"] > 1:
                row["flags"].append(f"{what}: spread larger than the effect")
        row["figures"]["KV bytes"] = {"ratio": r["kv_cache_bytes"] / van["kv_cache_bytes"]}
        if r["repeats"] == 1:
            row["flags"].append("one repeat: no spread measured")
        if warmup == 0:
            row["flags"].append("no warm-up: the first runs paid the cold start")
        out.append(row)
    return out


def format_comparisons(rows: list[dict]) -> str:
    """One line per comparison: 'hired@0.2 vs none (batch 1, 224x224): prefill 2.31x [1.90-2.80], ...'."""
    lines = []
    for row in rows:
        parts = []
        for what, f in row["figures"].items():
            spread = f" [{f['low']:.2f}-{f['high']:.2f}]" if "low" in f else ""
            parts.append(f"{what} {f['ratio']:.2f}x{spread}")
        flags = f"  ({'; '.join(row['flags'])})" if row["flags"] else ""
        size = "x".join(map(str, row["image_size"]))
        lines.append(f"{row['label']} vs none (batch {row['batch']}, {size}): {', '.join(parts)}{flags}")
    return "\n".join(lines)


def cached_tokens(r) -> int:
    """Tokens the cache should hold, summed over layers: text + that layer's image tokens + decoded tokens."""
    per_layer = [r["text_tokens"] + n + r["new_tokens"] - 1 for n in r["layer_image_tokens"]]
    return r["batch"] * sum(per_layer)


def _label(r) -> str:
    label = r["method"] if r["budget"] is None else f"{r['method']}@{r['budget']:g}"
    return f"{label} (control)" if r.get("control") else label


def format_controls(records: list[dict]) -> str:
    """One line per control configuration: what the stock model ran with ("" when there is none)."""
    seen = dict.fromkeys(f"{_label(r)}: the stock model with {r['control']} (its own setting for fewer visual "
                         "tokens), nothing dropped" for r in records if r.get("control"))
    return "\n".join(seen)


# ---- output ---------------------------------------------------------------------------------------
def _spread(r, key) -> str:
    med = r[key]
    half = 100 * (r[key + "_max"] - r[key + "_min"]) / 2 / med if med else 0.0
    return f"{med:.0f}±{half:.0f}%"


def format_table(records: list[dict]) -> str:
    """A fixed-width table: one row per configuration, medians ± half the min-max range."""
    head = ["method", "B", "image", "vis tok", "eq tok", "vision ms", "prefill ms", "decode ms/t", "tok/s",
            "peak MiB", "KV MiB", "prefill TFLOP"]
    rows = [head]
    for r in records:
        rows.append([_label(r), str(r["batch"]), "x".join(map(str, r["image_size"])), str(r["visual_tokens"]),
                     f"{r['equivalent_tokens']:.0f}", _spread(r, "vision_ms"), _spread(r, "prefill_ms"),
                     f"{r['decode_ms']:.1f}", f"{r['tokens_per_s']:.2f}", f"{r['peak_mem_bytes'] / 2**20:.0f}",
                     f"{r['kv_cache_bytes'] / 2**20:.1f}", f"{r['prefill_flops'] / 1e12:.3f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def plot(records: list[dict], path: str) -> None:
    """Prefill time and peak memory against budget, one line per method (first batch and image size),
    medians with min-max error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch, size = records[0]["batch"], records[0]["image_size"]
    chosen = [r for r in records if r["batch"] == batch and r["image_size"] == size]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, unit, scale in ((axes[0], "prefill_ms", "prefill time (ms)", 1.0),
                                 (axes[1], "peak_mem_bytes", "peak memory above baseline (MiB)", 2.0**-20)):
        for name in dict.fromkeys(r["method"] for r in chosen):
            rs = sorted((r for r in chosen if r["method"] == name), key=lambda r: r["budget"] or 1.0)
            xs = [r["budget"] if r["budget"] is not None else 1.0 for r in rs]
            ys = [r[key] * scale for r in rs]
            spread = [[(r[key] - r[key + "_min"]) * scale for r in rs], [(r[key + "_max"] - r[key]) * scale for r in rs]]
            if name == "none":
                ax.axhspan(rs[0][key + "_min"] * scale, rs[0][key + "_max"] * scale, color="black", alpha=0.08)
                ax.axhline(ys[0], color="black", linestyle="--", label="vanilla (none), min-max band")
                ax.errorbar(xs, ys, yerr=spread, fmt="k*", markersize=12, capsize=3)
            else:
                ax.errorbar(xs, ys, yerr=spread, marker="o", capsize=3,
                            label=name + (" (no budget)" if rs[0]["budget"] is None else ""))
        ax.set_xlabel("budget (fraction of visual tokens kept; in-LLM-only methods at 1.0)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    repeats = records[0]["repeats"]
    fig.suptitle(f"tokendrop bench: batch {batch}, image {size[0]}x{size[1]}; median of {repeats}, bars min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
