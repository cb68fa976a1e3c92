"""Serving benchmark: vLLM's OpenAI server, stock vs tokendrop methods, at several concurrency levels.

For every configuration a server is started on the same saved model (`tokendrop serve`'s command),
warmed up with one request, then loaded at each concurrency c with `requests` chat requests (c client
threads, streaming). Every request of a server carries a different image (the same size and kind), so
neither vLLM's prefix cache nor its encoder cache answers from an earlier request. Recorded per (configuration, c):
  requests_per_s      completed requests / wall time of the level,
  output_tokens_per_s generated tokens / wall time,
  ttft_ms             median time from sending a request to its first streamed token,
  kv_cache_peak       highest `vllm:kv_cache_usage_perc` (0-1) read from /metrics every 0.2 s,
  prompt_tokens       of one request (the image's placeholders + the text), from the server's usage.
Configurations run in rounds, the order rotated every round, so slow drifts of a shared machine hit
all of them; the JSON keeps every round. Only loopback addresses are used.
"""

from __future__ import annotations

import base64
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
#: the bundled model's chat template: images first, then "Q: ... A:"
CHAT_TEMPLATE = ("{%- for message in messages -%}{%- for part in message['content'] if part['type'] == 'image' -%}"
                 "{{ '<image>\\n' }}{%- endfor -%}Q: {% for part in message['content'] if part['type'] == 'text' %}"
                 "{{ part['text'] | trim }}{% endfor %} A:{%- endfor -%}")
KV_METRIC = re.compile(r"^vllm:kv_cache_usage_perc\{[^}]*\}\s+([0-9.eE+-]+)", re.M)


def prepare_arch_model(arch: str, folder: Path, vision_layers: int | None = None, seed: int = 0) -> str:
    """Random weights with `arch`'s widths (as `tokendrop bench --arch`), saved for vLLM; returns a description."""
    from tokendrop.bench import load_bench_model
    from tokendrop.loading import save_hub_layout

    model, processor, what = load_bench_model(arch=arch, vision_layers=vision_layers, seed=seed)
    processor.chat_template = CHAT_TEMPLATE
    save_hub_layout(model, processor, folder)  # the layout stock vLLM loads (the stock rows of the bench)
    return what


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


def kv_usage(url: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    return max((float(v) for v in KV_METRIC.findall(text)), default=0.0)


def load_level(url: str, images: list[str], concurrency: int, max_tokens: int) -> dict:
    """One request per image from `concurrency` threads; the level's figures (see the module docstring)."""
    requests = len(images)
    model = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=30).read())["data"][0]["id"]
    peak, done = [0.0], threading.Event()

    def watch():
        while not done.wait(0.2):
            peak[0] = max(peak[0], kv_usage(url))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda image: chat_request(url, model, image, max_tokens), images))
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    return {"concurrency": concurrency, "requests": requests, "wall_s": wall, "requests_per_s": requests / wall,
            "output_tokens_per_s": sum(r["completion_tokens"] for r in results) / wall,
            "ttft_ms": 1000 * statistics.median(r["ttft_s"] for r in results), "kv_cache_peak": peak[0],
            "prompt_tokens": results[0]["prompt_tokens"]}


def run(folder: str, configs: list[tuple[str, object]], levels: list[tuple[int, int]], make_image, max_tokens: int,
        vllm_args: list[str], rounds: int, log_dir: Path, progress=print) -> list[dict]:
    """Records for every round x configuration x (concurrency, requests) level; `make_image(seed)` gives
    the request images (seed 0 warms up, every level of a server gets its own seeds)."""
    images = [image_url(make_image(seed)) for seed in range(1 + sum(n for _, n in levels))]
    records = []
    for round_index in range(rounds):
        shift = round_index % len(configs)
        for label, method in configs[shift:] + configs[:shift]:
            with server(folder, method, vllm_args, log_dir / f"server-{label}-{round_index}.log") as url:
                chat_request(url, json.loads(urllib.request.urlopen(f"{url}/v1/models").read())["data"][0]["id"],
                             images[0], max_tokens)  # warm-up, not recorded
                first = 1
                for concurrency, requests in levels:
                    level = load_level(url, images[first : first + requests], concurrency, max_tokens)
                    first += requests
                    record = {"config": label, "round": round_index, **level}
                    progress(format_row(record))
                    records.append(record)
    return records


FIELDS = ("requests_per_s", "output_tokens_per_s", "ttft_ms", "kv_cache_peak")


def summary(records: list[dict]) -> list[dict]:
    """Per (config, concurrency), in first-seen order: the median over rounds of every field, and its
    spread as `<field>_min` / `<field>_max`."""
    keys = list(dict.fromkeys((r["config"], r["concurrency"]) for r in records))
    rows = []
    for config, concurrency in keys:
        group = [r for r in records if r["config"] == config and r["concurrency"] == concurrency]
        row = {"config": config, "concurrency": concurrency, "prompt_tokens": group[0]["prompt_tokens"],
               "rounds": len(group)}
        for field in FIELDS:
            values = [r[field] for r in group]
            row[field] = statistics.median(values)
            row[f"{field}_min"], row[f"{field}_max"] = min(values), max(values)
        rows.append(row)
    return rows


HEADER = f"{'config':<14}{'c':>3}{'prompt':>8}{'req/s':>8}{'out tok/s':>11}{'TTFT ms':>10}{'KV peak':>9}"


def format_row(r: dict) -> str:
    return (f"{r['config']:<14}{r['concurrency']:>3}{r['prompt_tokens']:>8}{r['requests_per_s']:>8.3f}"
            f"{r['output_tokens_per_s']:>11.2f}{r['ttft_ms']:>10.0f}{r['kv_cache_peak']:>9.1%}")


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
