"""`tokendrop serve-bench`: requests/s, output tokens/s, TTFT and KV-cache use of vLLM's server, stock vs methods.

    tokendrop serve-bench --json serve.json --plot serve.png          # next-bench-110m, random weights
    tokendrop serve-bench --configs none,hired@0.2 --concurrency 1,8 --requests 16 --max-num-seqs 8
    tokendrop serve-bench --arch qwen2.5-vl-bench --configs none,spatial@0.2 --image-size 448x448

Concurrency is swept up to saturation: a configuration stops after the first level that fills the KV
cache. Each row compares with stock (`none`) at the same level: speedup, the speedup the cost model
predicts from the token counts (ideal), and their ratio (fraction of ideal); a row slower than stock
is marked and warned about. Definitions: `tokendrop.vllm.serve_bench`.

Options tokendrop does not know go to every vLLM server unchanged. Logic: `tokendrop.vllm.serve_bench`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tokendrop.cli import UsageError
from tokendrop.cli.options import (add_json, comma_list, flag, one_int, output_path, parse_image_sizes, parse_ints,
                                   require_matplotlib)
from tokendrop.cli.serve import keep_unknown_for_vllm, vllm_installed

DEFAULT_CONFIGS = "none,hired@0.1,hired@0.2,hired@0.4,spatial@0.2"
#: vLLM options every server gets first (the user's own come after and win): fp32 as `tokendrop bench` on CPU;
#: then the model's own (`vllm_args_for`: its context length, remote code)
DEFAULT_VLLM_ARGS = ["--dtype", "float32", "--enforce-eager"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve-bench", help="benchmark vLLM's server: stock vs tokendrop methods, several concurrencies")
    p.add_argument("--model", default=None, help="a checkpoint folder vLLM loads, or 'bundled': the bundled trained "
                                                 "model (default: --arch with random weights)")
    p.add_argument("--arch", default="next-bench-110m", help="shipped arch with random weights (default: %(default)s)")
    p.add_argument("--vision-layers", default="4", help="with --arch: vision layers to build (default: %(default)s)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma list of METHOD@BUDGET (or none, base-only) served in turn (default: %(default)s)")
    p.add_argument("--concurrency", default="1,4,16,64",
                   help="comma list of concurrent clients, swept in order until the KV cache fills (default: %(default)s)")
    p.add_argument("--requests", default="4",
                   help="requests per concurrency level, at least the concurrency (default: %(default)s)")
    p.add_argument("--max-tokens", default="16", help="generated tokens per request (default: %(default)s)")
    p.add_argument("--image-size", default="672x672", help="HEIGHTxWIDTH of the request image (default: %(default)s)")
    p.add_argument("--rounds", default="1", help="rounds over the configurations, order rotated (default: %(default)s)")
    add_json(p, "every measured level and the medians")
    p.add_argument("--plot", default=None, metavar="PATH.png", help="requests/s, TTFT and KV use against concurrency")
    p.add_argument("--log-dir", default=None, help="folder for the servers' logs (default: a temporary folder)")
    keep_unknown_for_vllm(p)


def parse_configs(text: str) -> list[tuple[str, object]]:
    """'none,hired@0.2' -> [("none", None), ("hired@0.2", HiRED(0.2))], each method built and checked now."""
    from tokendrop.registry import build_methods

    configs = []
    for item in comma_list(text, "--configs"):
        name, _, budget = item.partition("@")
        with flag("--configs"):
            methods = build_methods(name, budget=float(budget) if budget else None)
            if len(methods) > 1:
                raise ValueError(f"{name!r} composes two methods; a server runs one pre-LLM method")
        configs.append((item, methods[0] if methods else None))
    return configs


def run(args) -> int:
    from tokendrop.bench import test_image
    from tokendrop.vllm import serve_bench as bench

    configs = parse_configs(args.configs)
    concurrency = sorted(set(parse_ints(args.concurrency, "--concurrency", low=1)))  # swept upwards
    requests = one_int(args.requests, "--requests", 1)
    levels = [(c, max(requests, c)) for c in concurrency]
    max_tokens, rounds = one_int(args.max_tokens, "--max-tokens", 1), one_int(args.rounds, "--rounds", 1)
    (height, width), = parse_image_sizes(args.image_size)[:1]
    out, plot = output_path(args.json, "--json"), output_path(args.plot, "--plot", suffix=".png")
    if plot is not None:
        require_matplotlib("--plot")
    if not vllm_installed():
        raise UsageError("serve-bench needs vLLM: pip install 'tokendrop[vllm]' (CPU machines: README, 'Serving with vLLM')")
    work = Path(args.log_dir or tempfile.mkdtemp(prefix="tokendrop-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    folder, what = prepare_model(args, work / "model")
    vllm_args = DEFAULT_VLLM_ARGS + bench.vllm_args_for(folder) + args.vllm_args
    for _, method in configs:  # every configuration is checked against the model before any server starts
        with flag("--configs"):
            bench.server_command_check(folder, method)
    costs = bench.PrefillCosts(folder, (height, width))
    print(f"model: {what}; image {height}x{width}; levels (concurrency, requests) {levels}; {max_tokens} tokens; "
          f"vLLM options {' '.join(vllm_args)}; logs in {work}")
    print(bench.HEADER)
    records = bench.run(folder, configs, levels, lambda seed: test_image(height, width, seed=seed), max_tokens,
                        vllm_args, rounds, work)
    rows, predicted = bench.compare(bench.summary(records), costs, configs)
    print("\nmedians over rounds:\n" + bench.format_table(rows))
    for line in bench.warnings(rows, predicted):
        print(line)
    if args.json is not None:
        text = json.dumps({"model": what, "vllm_args": vllm_args, "image_size": [height, width],
                           "prefill_costs": predicted, "records": records, "medians": rows}, indent=1)
        print(text) if out is None else out.write_text(text)
    if plot is not None:
        bench.plot(rows, str(plot))
    return 0


def prepare_model(args, folder: Path) -> tuple[str, str]:
    """(the folder vLLM serves, what it holds) for --model / --arch; a model tokendrop builds is saved
    in `folder` in the layout stock vLLM loads."""
    from tokendrop.vllm import serve_bench as bench

    if args.model == "bundled":
        return str(folder), bench.prepare_bundled_model(folder)
    if args.model is not None:
        return args.model, f"from_pretrained({args.model!r})"
    with flag("--arch"):
        return str(folder), bench.prepare_arch_model(args.arch, folder, one_int(args.vision_layers, "--vision-layers", 1))
