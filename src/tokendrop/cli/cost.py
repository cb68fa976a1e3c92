"""`tokendrop cost`: analytic FLOPs, KV cache and token counts of methods on a shipped architecture.

    tokendrop cost --arch llava-v1.6-vicuna-7b --image-size 672x672 --method none,hired,pdrop --budget 0.2
    tokendrop cost --arch llava-1.5-7b --tokens 576 --method none,pdrop,fastv     # the papers' tables

The argument parsers shared with `tokendrop bench` live here (comma lists, image sizes, budgets).
"""

from __future__ import annotations

import json

from tokendrop.cli import UsageError
from tokendrop.cli.options import (add_json, add_method_options, flag, label, method_configs, one_int, output_path,
                                   parse_image_sizes, write_output)

from tokendrop.cost import DEFAULT_TEXT_TOKENS

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cost", help="analytic FLOPs, KV cache and token counts of methods on a shipped architecture "
                                           "(no weights needed)")
    p.add_argument("--arch", default="llava-v1.6-vicuna-7b", help="shipped arch name or path to an arch .json (default: %(default)s)")
    p.add_argument("--image-size", default="672x672", help="comma list of HEIGHTxWIDTH (default: %(default)s)")
    add_method_options(p, default="none,hired,pdrop,fastv")
    p.add_argument("--text-tokens", default=str(DEFAULT_TEXT_TOKENS), help="prompt tokens besides the image (default: %(default)s)")
    p.add_argument("--tokens", default=None, help="override the stock visual-token count (papers: 576, 2880)")
    p.add_argument("--batch-size", "--batch", dest="batch_size", default="1", help="prompts per forward (default: %(default)s)")
    p.add_argument("--dtype", default="float16", help="KV-cache element type: float16, bfloat16, float32 (default: %(default)s)")
    add_json(p, "one record per configuration")


def run(args) -> int:
    from tokendrop import cost
    from tokendrop.registry import build_methods, configurations

    names, budgets, options = method_configs(args)
    configs = configurations(names, budgets)
    sizes = parse_image_sizes(args.image_size)
    text_tokens = one_int(args.text_tokens, "--text-tokens")
    batch = one_int(args.batch_size, "--batch-size", low=1)
    tokens = one_int(args.tokens, "--tokens", low=1)
    if args.dtype not in DTYPE_BYTES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {args.dtype!r}")
    out = output_path(args.json, "--json")
    with flag("--arch"):
        spec = cost.load_arch(args.arch)
    model = cost.meta_model(cost.arch_config(spec))
    images = cost.arch_geometry_processor(spec)  # the arch's resize settings (Qwen-VL counts depend on them)
    check_grid(model, images, configs, options, sizes, tokens)
    records = []
    for size in sizes:
        for name, budget in configs:
            methods = build_methods(name, budget=budget, **options)
            record = cost.method_cost(model, methods, size, text_tokens=text_tokens, batch=batch,
                                      bytes_per_element=DTYPE_BYTES[args.dtype], tokens=tokens, processor=images)
            record.update(method=name, budget=budget, arch=args.arch)
            records.append(record)
    if args.json == "-":
        print(json.dumps(records, indent=2))
        return 0
    print(f"arch {args.arch} ({spec.get('source', 'custom')}), LLM {records[0]['lm_params'] / 1e9:.2f}B params, "
          f"batch {batch}, {text_tokens} text tokens, KV in {args.dtype}")
    print(format_table(records))
    if out is not None:
        write_output(out, json.dumps(records, indent=2) + "\n", "--json")
        print(f"wrote {len(records)} records to {out}")
    return 0


def check_grid(model, images, configs, options, sizes, tokens) -> None:
    """What `apply()` and the patched processor would refuse, each named by its flag: an image size the
    family cannot lay out, a method the family cannot run or a layer beyond its depth, a budget that
    keeps no token."""
    from tokendrop import cost
    from tokendrop.registry import build_methods

    geometry = cost.geometry_of(model, images)
    for size in sizes:
        with flag(f"--image-size {size[0]}x{size[1]}"):
            geometry.layout(size)
    for name, budget in configs:
        methods = build_methods(name, budget=budget, **options)
        with flag(f"--method {name}"):
            cost.check_methods(model, methods)
        pre, _ = cost.split_methods(methods)
        for size in sizes if pre is not None else ():
            with flag("--budget"):
                cost.kept_tokens(pre, geometry, size, tokens)


def format_table(records: list[dict]) -> str:
    head = ["method", "image", "tiles", "vis tok", "eq tok", "PDrop TF", "FastV GF/l", "vision TF", "LLM prefill TF",
            "prefill TF", "decode GF/t", "KV MiB"]
    rows = [head]
    for r in records:
        rows.append([label(r["method"], r["budget"]), "x".join(map(str, r["image_size"])), "x".join(map(str, r["tiles"])) if r["tiles"] != [0, 0] else "-", str(r["visual_tokens"]),
                     f"{r['equivalent_tokens']:.0f}", f"{r['pdrop_tflops']:.3f}", f"{r['fastv_gflops_per_layer']:.1f}",
                     f"{r['vision_flops'] / 1e12:.2f}", f"{r['llm_prefill_flops'] / 1e12:.2f}",
                     f"{r['prefill_flops'] / 1e12:.2f}", f"{r['decode_flops_per_token'] / 1e9:.1f}",
                     f"{r['kv_cache_bytes'] / 2**20:.0f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.append("PDrop TF / FastV GF/l: paper conventions (multiply-add = 1 FLOP, LLM image tokens only); "
                 "other columns: real FLOPs (2 per multiply-add), see docs/cost_model.md")
    return "\n".join(lines)
