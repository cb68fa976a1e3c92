"""`tokendrop cost`: analytic FLOPs, KV cache and token counts of methods on a shipped architecture.

    tokendrop cost --arch llava-v1.6-vicuna-7b --image-size 672x672 --method none,hired,pdrop --budget 0.2
    tokendrop cost --arch llava-1.5-7b --tokens 576 --method none,pdrop,fastv     # the papers' tables

The argument parsers shared with `tokendrop bench` live here (comma lists, image sizes, budgets).
"""

from __future__ import annotations

import json

from tokendrop.cli import UsageError

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


# ---- shared argument parsing (strings in, UsageError out) -----------------------------------------
def comma_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    if not items:
        raise UsageError(f"{what} must list at least one value, got {text!r}")
    return items


def parse_image_sizes(text: str) -> list[tuple[int, int]]:
    """'672x672,1000x700' -> [(672, 672), (1000, 700)] as (height, width)."""
    sizes = []
    for item in comma_list(text, "--image-size"):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UsageError(f"--image-size must be HEIGHTxWIDTH in pixels (e.g. 672x672), got {item!r}")
        sizes.append((int(parts[0]), int(parts[1])))
    return sizes


def parse_budgets(text: str) -> list[float]:
    budgets = []
    for item in comma_list(text, "--budget"):
        try:
            value = float(item)
        except ValueError:
            raise UsageError(f"--budget must be numbers in (0, 1], got {item!r}") from None
        if not 0.0 < value <= 1.0:
            raise UsageError(f"--budget must be in (0, 1], got {item}")
        budgets.append(value)
    return budgets


def parse_ints(text: str | None, what: str, low: int = 0) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in comma_list(text, what)]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if any(v < low for v in values):
        raise UsageError(f"{what} must be integers >= {low}, got {text!r}")
    return values


def parse_methods(text: str) -> list[str]:
    """Method names, each validated by the registry (ValueError with 'did you mean')."""
    from tokendrop.registry import split_name

    names = comma_list(text, "--method")
    for name in names:
        split_name(name)
    return names


def add_method_options(p) -> None:
    """Options that configure the methods (shared by cost and bench)."""
    p.add_argument("--method", default="none,hired,pdrop,fastv",
                   help="comma list of methods: none, hired, hired-official, random, spatial, pdrop, fastv, or "
                        "compositions such as hired+pdrop (default: %(default)s)")
    p.add_argument("--budget", default="0.2", help="comma list of budgets in (0, 1] for pre-LLM methods (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="HiRED base-image share (default: %(default)s)")
    p.add_argument("--pdrop-layers", default=None, help="PyramidDrop stage boundaries, e.g. 8,16,24 (default: depth/4, /2, 3/4)")
    p.add_argument("--ratio", type=float, default=0.5, help="PyramidDrop lambda (default: %(default)s)")
    p.add_argument("--k", type=int, default=2, help="FastV layer K (default: %(default)s)")
    p.add_argument("--drop", type=float, default=0.5, help="FastV dropped fraction R (default: %(default)s)")


def method_options(args) -> dict:
    layers = parse_ints(args.pdrop_layers, "--pdrop-layers", low=1)
    return {"alpha": args.alpha, "layers": tuple(layers) if layers else None, "ratio": args.ratio, "k": args.k, "drop": args.drop}


# ---- tokendrop cost ----------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    from tokendrop.cost import DEFAULT_TEXT_TOKENS

    p = subparsers.add_parser("cost", help="analytic FLOPs / KV cache / token counts on a shipped architecture")
    p.add_argument("--arch", default="llava-v1.6-vicuna-7b", help="shipped arch name or path to an arch .json (default: %(default)s)")
    p.add_argument("--image-size", default="672x672", help="HEIGHTxWIDTH (default: %(default)s)")
    add_method_options(p)
    p.add_argument("--text-tokens", default=str(DEFAULT_TEXT_TOKENS), help="prompt tokens besides the image (default: %(default)s)")
    p.add_argument("--tokens", default=None, help="override the stock visual-token count (papers: 576, 2880)")
    p.add_argument("--batch", default="1", help="prompts per forward (default: %(default)s)")
    p.add_argument("--dtype", default="float16", help="KV-cache element type: float16, bfloat16, float32 (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="write one JSON record per method to PATH")


def run(args) -> int:
    from tokendrop import cost
    from tokendrop.registry import build_methods, needs_budget

    names, budgets, options = parse_methods(args.method), parse_budgets(args.budget), method_options(args)
    sizes = parse_image_sizes(args.image_size)
    text_tokens = parse_ints(args.text_tokens, "--text-tokens")[0]
    batch = parse_ints(args.batch, "--batch", low=1)[0]
    tokens = None if args.tokens is None else parse_ints(args.tokens, "--tokens", low=1)[0]
    if args.dtype not in DTYPE_BYTES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {args.dtype!r}")
    spec = cost.load_arch(args.arch)
    model = cost.meta_model(cost.arch_config(spec))
    records = []
    for size in sizes:
        for name in names:
            for budget in budgets if needs_budget(name) else [None]:
                methods = build_methods(name, budget=budget, **options)
                record = cost.method_cost(model, methods, size, text_tokens=text_tokens, batch=batch,
                                          bytes_per_element=DTYPE_BYTES[args.dtype], tokens=tokens)
                record.update(method=name, budget=budget, arch=args.arch)
                records.append(record)
    print(f"arch {args.arch} ({spec.get('source', 'custom')}), LLM {records[0]['lm_params'] / 1e9:.2f}B params, "
          f"batch {batch}, {text_tokens} text tokens, KV in {args.dtype}")
    print(format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


def format_table(records: list[dict]) -> str:
    head = ["method", "image", "tiles", "vis tok", "eq tok", "PDrop TF", "FastV GF/l", "vision TF", "LLM prefill TF",
            "prefill TF", "decode GF/t", "KV MiB"]
    rows = [head]
    for r in records:
        label = r["method"] if r["budget"] is None else f"{r['method']}@{r['budget']:g}"
        rows.append([label, "x".join(map(str, r["image_size"])), "x".join(map(str, r["tiles"])) if r["tiles"] != [0, 0] else "-", str(r["visual_tokens"]),
                     f"{r['equivalent_tokens']:.0f}", f"{r['pdrop_tflops']:.3f}", f"{r['fastv_gflops_per_layer']:.1f}",
                     f"{r['vision_flops'] / 1e12:.2f}", f"{r['llm_prefill_flops'] / 1e12:.2f}",
                     f"{r['prefill_flops'] / 1e12:.2f}", f"{r['decode_flops_per_token'] / 1e9:.1f}",
                     f"{r['kv_cache_bytes'] / 2**20:.0f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.append("PDrop TF / FastV GF/l: paper conventions (multiply-add = 1 FLOP, LLM image tokens only); "
                 "other columns: real FLOPs (2 per multiply-add), see docs/cost_model.md")
    return "\n".join(lines)
