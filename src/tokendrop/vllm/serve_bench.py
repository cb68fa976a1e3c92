"""Serving benchmark: vLLM's OpenAI server, stock vs tokendrop methods, concurrency swept up to saturation.

For every configuration a server is started on the same saved model (`tokendrop serve`'s command),
warmed up with one request, then loaded at each concurrency c in turn with max(requests, c) chat
requests (c client threads, streaming). Every request of a server carries a different image (the same
size and kind), so neither vLLM's prefix cache nor its encoder cache answers from an earlier request.
Recorded per (configuration, c):
  requests_per_s      completed requests / wall time of the level,
  output_tokens_per_s generated tokens / wall time,
  ttft_ms, ttft_p95_ms  median and 95th percentile (linear interpolation between the sorted values)
                      of the time from sending a request to its first streamed token,
  kv_cache_peak       highest `vllm:kv_cache_usage_perc` (0-1) read from /metrics every 0.2 s,
  kv_full             the level filled the KV cache (below),
  prompt_tokens       of one request (the image's placeholders + the text), from the server's usage.

Saturation. A level fills the KV cache when, during it, vLLM preempted a request
(`vllm:num_preemptions` grew: a running request could not get a new block) or a /metrics sample saw
requests waiting while the free cache, (1 - `kv_cache_usage_perc`) x `num_gpu_blocks` x `block_size`
(both from `vllm:cache_config_info`), was smaller than one request's prompt + max_tokens tokens: the
server then holds no more requests at once, so a higher concurrency only lengthens the queue. That
configuration's sweep stops after such a level (the higher levels are not run).

Fraction of ideal (`compare_with_stock`), per configuration and level, against the stock ("none")
configuration at the same level:
  speedup  = requests_per_s / stock requests_per_s,
  ideal    = stock prefill FLOPs / the configuration's prefill FLOPs, from tokendrop's cost model
             (`tokendrop.cost.method_cost` on the served model's config and processor, the benchmark's
             image size and the prompt's text tokens): vision tower + projector + the method's scoring
             + LLM prefill, i.e. the speedup the token counts predict if prefill were all the work,
  fraction = speedup / ideal.
A fraction below 1 is serving work the token counts do not shrink: decoding max_tokens tokens per
request, image preprocessing, HTTP and scheduling. A configuration that serves fewer requests/s than
stock at some level is flagged (`slower_than_stock`).
Configurations run in rounds, the order rotated every round, so slow drifts of a shared machine hit
all of them; the JSON keeps every round. Only loopback addresses are used.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

QUESTION = "Describe the image in detail."
MAX_MODEL_LEN = 4096  #: tokens of context a server gets (the model's own limit if shorter)
#: the bundled model's chat template: images first, then "Q: ... A:"
CHAT_TEMPLATE = ("{%- for message in messages -%}{%- for part in message['content'] if part['type'] == 'image' -%}"
                 "{{ '<image>\\n' }}{%- endfor -%}Q: {% for part in message['content'] if part['type'] == 'text' %}"
                 "{{ part['text'] | trim }}{% endfor %} A:{%- endfor -%}")


def prepare_arch_model(arch: str, folder: Path, vision_layers: int | None = None, seed: int = 0) -> str:
    """Random weights with `arch`'s widths (as `tokendrop bench --arch`), saved for vLLM; returns a description."""
    from tokendrop.bench import load_bench_model
    from tokendrop.loading import save_hub_layout

    model, processor, what = load_bench_model(arch=arch, vision_layers=vision_layers, seed=seed)
    if not getattr(processor, "chat_template", None):  # the LLaVA arch processors carry none (Qwen-VL's do)
        processor.chat_template = CHAT_TEMPLATE
    save_hub_layout(model, processor, folder)  # the layout stock vLLM loads (the stock rows of the bench)
    add_video_processor(folder, model.config.model_type)
    return what


def add_video_processor(folder: Path, model_type: str) -> bool:
    """Give a saved model whose processor owns a video processor (Qwen-VL) one vLLM can build: the
    stock one where torchvision is installed (tokendrop's processors are image-only, so none was
    saved), else `VIDEO_STUB`. False: the processor has none, nothing to do."""
    import transformers
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    from tokendrop.processors import owns_video_processor
    from tokendrop.registry import family_of

    if not owns_video_processor(family_of(model_type).processor_class):
        return False
    if (Path(folder) / "video_preprocessor_config.json").exists():
        return True
    if importlib.util.find_spec("torchvision") is None:
        write_video_stub(folder)
        return True
    names = VIDEO_PROCESSOR_MAPPING_NAMES[model_type]  # {"torchvision": class name} (or the name itself)
    getattr(transformers, names["torchvision"] if isinstance(names, dict) else names)().save_pretrained(folder)
    return True


#: Remote code standing in for the video processor of a saved model (Qwen-VL): vLLM builds the model's whole
#: processor, transformers' video processors need torchvision, and CPU machines here have none. It serves no
#: video; `write_video_stub` puts it beside the model, which is then served with --trust-remote-code.
VIDEO_STUB = '''
import importlib.util

import transformers


class NoVideoKwargs:
    __annotations__ = {}


class StubVideoProcessor(dict):
    valid_kwargs = NoVideoKwargs
    tokendrop_stub = True
    merge_size = 2
    temporal_patch_size = 2
    patch_size = 16
    size = {"shortest_edge": 4 * 32 * 32, "longest_edge": 2 * 96 * 32 * 32}  # vLLM's Qwen3-VL sizes videos with it

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    @classmethod
    def register_for_auto_class(cls, *args, **kwargs):
        pass


if importlib.util.find_spec("torchvision") is None:
    if getattr(vars(transformers).get("VideoProcessorMixin"), "tokendrop_stub", False):  # (lazy: needs torchvision)
        StubVideoProcessor = transformers.VideoProcessorMixin  # one stand-in per process (each folder has its copy)
    else:
        transformers.VideoProcessorMixin = StubVideoProcessor  # the class the processor checks its video processor against
'''


def write_video_stub(folder: Path) -> None:
    """Put `VIDEO_STUB` beside a saved model as its video processor (load it with trust_remote_code)."""
    folder = Path(folder)
    (folder / "video_stub.py").write_text(VIDEO_STUB)
    (folder / "video_preprocessor_config.json").write_text(
        json.dumps({"auto_map": {"AutoVideoProcessor": "video_stub.StubVideoProcessor"}}))


def vllm_args_for(folder: Path) -> list[str]:
    """vLLM options the saved model needs: a context of MAX_MODEL_LEN tokens or the model's own limit if
    shorter (vLLM refuses a longer one), and --trust-remote-code when it carries the video stub."""
    from tokendrop.loading import load_config

    text = load_config(str(folder)).get_text_config()
    length = min(MAX_MODEL_LEN, getattr(text, "max_position_embeddings", None) or MAX_MODEL_LEN)
    stub = ["--trust-remote-code"] if (Path(folder) / "video_stub.py").exists() else []
    return ["--max-model-len", str(length), *stub]


def prepare_bundled_model(folder: Path) -> str:
    """The bundled trained model saved in `folder` in the layout stock vLLM loads; returns a description."""
    from tokendrop.loading import bundled_model_path, load_model, save_hub_layout

    path = bundled_model_path()
    if path is None:
        raise ValueError("this install has no bundled model (tokendrop/assets/model)")
    model, processor = load_model(str(path), device="cpu")
    save_hub_layout(model, processor, folder)
    return f"the bundled trained model ({path}), saved in the hub layout"


def server_command_check(folder: str, method) -> None:
    """Raise now (ValueError naming the problem) if `method` cannot be served on the model at `folder`."""
    from tokendrop.vllm.server import server_command

    server_command(folder, method)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(folder: str, method, vllm_args: list[str], log_path: Path, startup_s: float = 600):
    """A running server (its base URL) for `folder` served with `method` (None: stock); stopped on exit."""
    from tokendrop.vllm.server import server_command

    port = free_port()
    command = server_command(folder, method, ["--host", "127.0.0.1", "--port", str(port), *vllm_args])
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_s
            while not _healthy(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the vLLM server did not start (exit code {process.poll()}); log: {log_path}")
                time.sleep(1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def _healthy(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/health", timeout=5)
        return True
    except OSError:
        return False


def image_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_request(url: str, model: str, image: str, max_tokens: int) -> dict:
    """One streamed chat request: {"ttft_s", "prompt_tokens", "completion_tokens"}."""
    body = {"model": model, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": QUESTION}]}]}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start, first, usage = time.perf_counter(), None, None
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    return {"ttft_s": (first or time.perf_counter()) - start, "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"]}


STOCK = "none"  #: the configuration every other is compared with
METRIC_LINE = re.compile(r"^(vllm:[A-Za-z_]+)(?:\{([^}]*)\})?\s+(\S+)$", re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')


def parse_metrics(text: str) -> dict:
    """What the sweep reads from a /metrics page: {"kv_usage" (0-1), "waiting" (requests),
    "preemptions" (since start), "cache_tokens" (the KV cache's size in tokens, None if unpublished)}."""
    values, cache_tokens = {}, None
    for name, labels, value in METRIC_LINE.findall(text):
        if name == "vllm:cache_config_info":
            info = dict(LABEL.findall(labels))
            if info.get("num_gpu_blocks", "None").isdigit() and info.get("block_size", "").isdigit():
                cache_tokens = int(info["num_gpu_blocks"]) * int(info["block_size"])
        elif name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_waiting", "vllm:num_preemptions_total"):
            values[name] = max(values.get(name, 0.0), float(value))  # one engine: one sample per name
    return {"kv_usage": values.get("vllm:kv_cache_usage_perc", 0.0),
            "waiting": values.get("vllm:num_requests_waiting", 0.0),
            "preemptions": values.get("vllm:num_preemptions_total", 0.0), "cache_tokens": cache_tokens}


def read_metrics(url: str) -> dict:
    return parse_metrics(urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode())


def kv_usage(url: str) -> float:
    return read_metrics(url)["kv_usage"]


def cache_full(sample: dict, request_tokens: int) -> bool:
    """Whether a /metrics sample shows requests waiting for cache space: some wait, and the free cache
    is smaller than one request (`request_tokens`: its prompt + max_tokens)."""
    if sample["waiting"] <= 0 or sample["cache_tokens"] is None:
        return False
    return (1.0 - sample["kv_usage"]) * sample["cache_tokens"] < request_tokens


class CacheWatch:
    """Samples /metrics every 0.2 s while in use: `peak` KV use, and `full` (see the module docstring)."""

    def __init__(self, url: str, request_tokens: int):
        self.url, self.request_tokens = url, request_tokens
        self.peak, self.full, self.done = 0.0, False, threading.Event()

    def __enter__(self):
        self.preemptions = read_metrics(self.url)["preemptions"]
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    def watch(self) -> None:
        while not self.done.wait(0.2):
            self.sample(read_metrics(self.url))

    def sample(self, sample: dict) -> None:
        self.peak = max(self.peak, sample["kv_usage"])
        self.full = self.full or cache_full(sample, self.request_tokens) or sample["preemptions"] > self.preemptions

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.sample(read_metrics(self.url))  # a preemption counted after the last sample


def percentile(values, q: float) -> float:
    """The q-quantile (0-1) of `values`, linear interpolation between the sorted values."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def level_figures(results: list[dict], wall: float, concurrency: int) -> dict:
    """A level's figures from its requests' results (`chat_request`) and its wall time in seconds."""
    ttft_ms = [1000 * r["ttft_s"] for r in results]
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "requests_per_s": len(results) / wall,
            "output_tokens_per_s": sum(r["completion_tokens"] for r in results) / wall,
            "ttft_ms": statistics.median(ttft_ms), "ttft_p95_ms": percentile(ttft_ms, 0.95),
            "prompt_tokens": results[0]["prompt_tokens"]}


def served_model(url: str) -> str:
    return json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=30).read())["data"][0]["id"]


def load_level(url: str, images: list[str], concurrency: int, max_tokens: int, request_tokens: int) -> dict:
    """One request per image from `concurrency` threads; the level's figures (see the module docstring)."""
    model = served_model(url)
    with CacheWatch(url, request_tokens) as watch:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda image: chat_request(url, model, image, max_tokens), images))
        wall = time.perf_counter() - start
    return {**level_figures(results, wall, concurrency), "kv_cache_peak": watch.peak, "kv_full": watch.full}


def run(folder: str, configs: list[tuple[str, object]], levels: list[tuple[int, int]], make_image, max_tokens: int,
        vllm_args: list[str], rounds: int, log_dir: Path, progress=print) -> list[dict]:
    """Records for every round x configuration x (concurrency, requests) level up to the first that
    fills the KV cache; `make_image(seed)` gives the request images (seed 0 warms up, every level of a
    server gets its own seeds)."""
    images = [image_url(make_image(seed)) for seed in range(1 + sum(n for _, n in levels))]
    records = []
    for round_index in range(rounds):
        shift = round_index % len(configs)
        for label, method in configs[shift:] + configs[:shift]:
            with server(folder, method, vllm_args, log_dir / f"server-{label}-{round_index}.log") as url:
                warm = chat_request(url, served_model(url), images[0], max_tokens)  # not recorded
                first = 1
                for concurrency, requests in levels:
                    level = load_level(url, images[first : first + requests], concurrency, max_tokens,
                                       warm["prompt_tokens"] + max_tokens)
                    first += requests
                    record = {"config": label, "round": round_index, **level}
                    progress(format_row(record))
                    records.append(record)
                    if level["kv_full"]:
                        progress(f"{label}: the KV cache filled at concurrency {concurrency}; higher levels skipped")
                        break
    return records


FIELDS = ("requests_per_s", "output_tokens_per_s", "ttft_ms", "ttft_p95_ms", "kv_cache_peak")


def summary(records: list[dict]) -> list[dict]:
    """Per (config, concurrency), in first-seen order: the median over rounds of every field, and its
    spread as `<field>_min` / `<field>_max`; `kv_full` if any round filled the cache there."""
    keys = list(dict.fromkeys((r["config"], r["concurrency"]) for r in records))
    rows = []
    for config, concurrency in keys:
        group = [r for r in records if r["config"] == config and r["concurrency"] == concurrency]
        row = {"config": config, "concurrency": concurrency, "prompt_tokens": group[0]["prompt_tokens"],
               "rounds": len(group), "kv_full": any(r.get("kv_full", False) for r in group)}
        for field in FIELDS:
            values = [r[field] for r in group if field in r]  # ttft_p95_ms: not in older records
            if values:
                row[field] = statistics.median(values)
                row[f"{field}_min"], row[f"{field}_max"] = min(values), max(values)
        rows.append(row)
    return rows


class PrefillCosts:
    """tokendrop's cost model (`tokendrop.cost.method_cost`) on the served model's config and processor,
    for the benchmark's image size: what each configuration's token counts predict."""

    def __init__(self, folder: str, image_size: tuple[int, int]):
        from tokendrop import cost
        from tokendrop.loading import load_config, load_processor
        from tokendrop.registry import family_of

        config = load_config(folder)
        self.model = cost.meta_model(config)  # shapes only, on the meta device
        self.processor = load_processor(folder, family_of(config.model_type).processor_class)
        self.image_size = image_size

    def cost(self, method, text_tokens: int) -> dict:
        from tokendrop import cost

        return cost.method_cost(self.model, (method,) if method else (), self.image_size, text_tokens=text_tokens,
                                processor=self.processor)

    def predict(self, configs: list[tuple[str, object]], stock_prompt_tokens: int) -> dict[str, dict]:
        """label -> {"visual_tokens", "prompt_tokens", "prefill_flops"}; the text tokens are the stock
        request's prompt (from the server) less the stock visual tokens (from the cost model)."""
        text = stock_prompt_tokens - self.cost(None, 0)["visual_tokens"]
        costs = {}
        for label, method in configs:
            record = self.cost(method, text)
            costs[label] = {"visual_tokens": record["visual_tokens"], "prompt_tokens": text + record["visual_tokens"],
                            "prefill_flops": record["prefill_flops"]}
        return costs


def compare_with_stock(rows: list[dict], costs: dict[str, dict]) -> list[dict]:
    """The rows with `speedup`, `ideal_speedup`, `fraction_of_ideal` (module docstring; None where
    stock did not run that level or a cost is missing) and `slower_than_stock`."""
    stock = {r["concurrency"]: r for r in rows if r["config"] == STOCK}
    compared = []
    for row in rows:
        base, mine = stock.get(row["concurrency"]), costs.get(row["config"])
        speedup = row["requests_per_s"] / base["requests_per_s"] if base else None
        ideal = costs[STOCK]["prefill_flops"] / mine["prefill_flops"] if mine and STOCK in costs else None
        compared.append({**row, "speedup": speedup, "ideal_speedup": ideal,
                         "fraction_of_ideal": speedup / ideal if speedup is not None and ideal else None,
                         "slower_than_stock": speedup is not None and speedup < 1.0})
    return compared


def compare(rows: list[dict], costs: PrefillCosts, configs: list[tuple[str, object]]) -> tuple[list[dict], dict]:
    """(`rows` compared with stock, the cost model's prediction per configuration); without a stock
    configuration there is nothing to compare with, and both stay empty of comparisons."""
    stock = [r for r in rows if r["config"] == STOCK]
    predicted = costs.predict(configs, stock[0]["prompt_tokens"]) if stock else {}
    return compare_with_stock(rows, predicted), predicted


def warnings(rows: list[dict], costs: dict[str, dict]) -> list[str]:
    """One line per level a configuration serves fewer requests/s than stock, and per configuration
    whose served prompt length differs from the cost model's (its ideal would be wrong)."""
    lines = [f"warning: {r['config']} serves {r['requests_per_s']:.3f} req/s at concurrency {r['concurrency']}, "
             f"fewer than stock ({r['requests_per_s'] / r['speedup']:.3f})" for r in rows if r.get("slower_than_stock")]
    served = {r["config"]: r["prompt_tokens"] for r in rows}
    for label, cost in costs.items():
        if label in served and served[label] != cost["prompt_tokens"]:
            lines.append(f"warning: {label}: the server counts {served[label]} prompt tokens, the cost model "
                         f"{cost['prompt_tokens']}")
    return lines


HEADER = (f"{'config':<14}{'c':>4}{'prompt':>8}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'p95 ms':>9}"
          f"{'KV peak':>9}{'speedup':>9}{'ideal':>7}{'of ideal':>10}  note")


def _optional(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def format_row(r: dict) -> str:
    """One table line; "slower than stock" and "KV full" in the note column."""
    notes = [note for flag, note in (("slower_than_stock", "SLOWER than stock"), ("kv_full", "KV full")) if r.get(flag)]
    return (f"{r['config']:<14}{r['concurrency']:>4}{r['prompt_tokens']:>8}{r['requests_per_s']:>8.3f}"
            f"{r['output_tokens_per_s']:>11.2f}{r['ttft_ms']:>10.0f}{_optional(r.get('ttft_p95_ms'), '.0f', 9)}"
            f"{r['kv_cache_peak']:>9.1%}{_optional(r.get('speedup'), '.2f', 9)}"
            f"{_optional(r.get('ideal_speedup'), '.2f', 7)}{_optional(r.get('fraction_of_ideal'), '.0%', 10)}"
            f"  {', '.join(notes)}").rstrip()


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEADER, *(format_row(r) for r in rows)])


PLOTTED = (("requests_per_s", "requests / s", 1.0), ("ttft_ms", "time to first token (s)", 1e-3),
           ("kv_cache_peak", "KV cache peak (% of the cache)", 100.0))


def plot(rows: list[dict], path: str) -> None:
    """Requests/s, TTFT and KV-cache peak against concurrency, one line per configuration: the median
    over rounds, bars from the smallest to the largest round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(13, 3.8))
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        c = [r["concurrency"] for r in mine]
        for ax, (field, title, scale) in zip(axes, PLOTTED):
            mid = [r[field] * scale for r in mine]
            low = [m - r.get(f"{field}_min", r[field]) * scale for m, r in zip(mid, mine)]
            high = [r.get(f"{field}_max", r[field]) * scale - m for m, r in zip(mid, mine)]
            ax.errorbar(c, mid, yerr=[low, high], marker="o", capsize=3, label=config)
            ax.set_xlabel("concurrent requests")
            ax.set_title(title)
    rounds = max(r.get("rounds", 1) for r in rows)
    axes[0].legend(title=f"median of {rounds} rounds, bars min-max" if rounds > 1 else None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
