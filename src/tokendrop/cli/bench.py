"""`tokendrop bench`: measured vision / prefill / decode time, memory and KV cache per method.

    tokendrop bench                                            # the bundled model (or a tiny one)
    tokendrop bench --arch next-bench-110m --method none,hired,spatial,pdrop,fastv --budget 0.2 \\
        --batch 1,4 --repeats 3 --json bench.json --plot bench.png
"""

from __future__ import annotations

import json

from tokendrop.cli import UsageError
from tokendrop.cli.cost import add_method_options, method_options, parse_budgets, parse_image_sizes, parse_ints, parse_methods


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure speed and memory of methods x budgets x batch sizes x image sizes")
    where = p.add_argument_group("model (default: the bundled model)")
    where.add_argument("--model", default=None, help="a LLaVA / LLaVA-NeXT checkpoint directory or hub id")
    where.add_argument("--arch", default=None, help="shipped arch name (or .json path): random weights, real widths")
    where.add_argument("--layers", default=None, help="with --arch: LLM layers to build")
    where.add_argument("--vision-layers", default=None, help="with --arch: vision encoder layers to build")
    add_method_options(p)
    p.set_defaults(method="none,hired,spatial,pdrop,fastv")
    p.add_argument("--batch", default="1", help="comma list of batch sizes (default: %(default)s)")
    p.add_argument("--image-size", default=None, help="comma list of HEIGHTxWIDTH (default: a 2x2-grid image)")
    p.add_argument("--repeats", default="3", help="timed runs per configuration (default: %(default)s)")
    p.add_argument("--warmup", default="1", help="untimed rounds first (default: %(default)s)")
    p.add_argument("--new-tokens", default="8", help="tokens generated per run, >= 2 (default: %(default)s)")
    p.add_argument("--threads", default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", default="0", help="seed of the random weights (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="write a JSON list, one record per configuration")
    p.add_argument("--plot", default=None, metavar="PATH.png", help="plot prefill time and memory against budget")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _one_int(text, what, low):
    return None if text is None else parse_ints(text, what, low=low)[0]


def build_grid(args):
    from tokendrop.bench import Grid

    return Grid(methods=parse_methods(args.method), budgets=parse_budgets(args.budget),
                batches=parse_ints(args.batch, "--batch", low=1),
                image_sizes=parse_image_sizes(args.image_size) if args.image_size else None,
                repeats=_one_int(args.repeats, "--repeats", 1), warmup=_one_int(args.warmup, "--warmup", 0),
                new_tokens=_one_int(args.new_tokens, "--new-tokens", 2), options=method_options(args))


def run(args) -> int:
    import torch

    from tokendrop import bench

    grid = build_grid(args)
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot must be a .png path, got {args.plot!r}")
    if args.model is not None and args.arch is not None:
        raise UsageError("give either --model or --arch, not both")
    if args.arch is None and (args.layers is not None or args.vision_layers is not None):
        raise UsageError("--layers / --vision-layers only apply with --arch")
    threads = _one_int(args.threads, "--threads", 1)
    if threads:
        torch.set_num_threads(threads)
    grid.configs()  # validate method options before loading a model
    layers, vision_layers = _one_int(args.layers, "--layers", 1), _one_int(args.vision_layers, "--vision-layers", 1)
    try:
        model, processor, what = bench.load_model(args.model, args.arch, layers, vision_layers, _one_int(args.seed, "--seed", 0))
    except OSError as err:  # missing directory, hub id without network, ...
        raise UsageError(f"--model {args.model!r} could not be loaded: {str(err).splitlines()[0]}") from None
    processor.tokenizer.padding_side = "left"
    print(f"model: {what}; fp32, {model.config._attn_implementation}, {torch.get_num_threads()} threads")
    records = bench.run_grid(model, processor, grid, progress=not args.no_progress)
    verdicts = bench.targets(records, budget=grid.budgets[0])
    print(bench.format_table(records))
    print("median ± half the min-max range; peak = memory above the pre-call baseline (RSS sampled on CPU)")
    if verdicts:
        print(bench.format_targets(verdicts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r, model=what) for r in records], f, indent=2)
        print(f"wrote {len(records)} records to {args.json}")
    if args.plot:
        bench.plot(records, args.plot)
        print(f"wrote {args.plot}")
    return 0
