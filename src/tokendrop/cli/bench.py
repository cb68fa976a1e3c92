"""`tokendrop bench`: measured vision / prefill / decode time, memory and KV cache per method.

    tokendrop bench                                            # the bundled model (or a tiny one)
    tokendrop bench --arch next-bench-110m --method none,hired,spatial,pdrop,fastv --budget 0.2 \\
        --batch-size 1,4 --repeats 3 --json bench.json --plot bench.png
"""

from __future__ import annotations

import json

from tokendrop.cli import UsageError
from tokendrop.cli.options import (add_json, add_method_options, check_on_config, check_on_model, figure_bytes, flag, method_configs,
                                   one_int, output_path, parse_image_sizes, parse_ints, require_matplotlib,
                                   write_output)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure speed and memory of methods x budgets x batch sizes x image sizes")
    where = p.add_argument_group("model (default: the bundled model)")
    where.add_argument("--model", default=None, help="a checkpoint folder or hub id, or 'tiny'")
    where.add_argument("--arch", default=None, help="shipped arch name (or .json path): random weights, real widths")
    where.add_argument("--layers", default=None, help="with --arch: LLM layers to build")
    where.add_argument("--vision-layers", default=None, help="with --arch: vision encoder layers to build")
    add_method_options(p, default="none,hired,spatial,pdrop,fastv")
    p.add_argument("--batch-size", "--batch", dest="batch_size", default="1", help="comma list of batch sizes (default: %(default)s)")
    p.add_argument("--image-size", default=None, help="comma list of HEIGHTxWIDTH (default: a 2x2-grid image)")
    p.add_argument("--repeats", default="3", help="timed runs per configuration (default: %(default)s)")
    p.add_argument("--warmup", default="1", help="untimed rounds first (default: %(default)s)")
    p.add_argument("--max-new-tokens", "--new-tokens", dest="max_new_tokens", default="8",
                   help="tokens generated per run, >= 2 (default: %(default)s)")
    p.add_argument("--threads", default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", default="0", help="seed of the random weights (default: %(default)s)")
    add_json(p, "a list, one record per configuration")
    p.add_argument("--plot", default=None, metavar="PATH.png", help="plot prefill time and memory against budget")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_grid(args):
    from tokendrop.bench import Grid

    names, budgets, options = method_configs(args)
    with flag("--method"):
        return Grid(methods=names, budgets=budgets, batches=parse_ints(args.batch_size, "--batch-size", low=1),
                    image_sizes=parse_image_sizes(args.image_size) if args.image_size else None,
                    repeats=one_int(args.repeats, "--repeats", 1), warmup=one_int(args.warmup, "--warmup", 0),
                    new_tokens=one_int(args.max_new_tokens, "--max-new-tokens", 2), options=options)


def run(args) -> int:
    import torch

    from tokendrop import bench

    grid = build_grid(args)
    out, plot = output_path(args.json, "--json"), output_path(args.plot, "--plot", suffix=".png")
    if plot is not None:
        require_matplotlib("--plot")
    if args.model is not None and args.arch is not None:
        raise UsageError("give either --model or --arch, not both")
    if args.arch is None and (args.layers is not None or args.vision_layers is not None):
        raise UsageError("--layers / --vision-layers only apply with --arch")
    threads = one_int(args.threads, "--threads", 1)
    layers, vision_layers = one_int(args.layers, "--layers", 1), one_int(args.vision_layers, "--vision-layers", 1)
    seed = one_int(args.seed, "--seed", 0)
    if args.arch is not None:
        with flag("--arch"):
            from tokendrop.cost import load_arch

            load_arch(args.arch)
    if threads:
        torch.set_num_threads(threads)
    if args.arch is None:
        from tokendrop.cli.options import load_model_flag

        check_on_config(args.model, grid.methods, grid.budgets, grid.options)  # before minutes of loading weights
        model, processor, what = load_model_flag(args.model, seed=seed)
        what = what or f"from_pretrained({args.model!r})"
    else:
        model, processor, what = bench.load_bench_model(None, args.arch, layers, vision_layers, seed)
    processor.tokenizer.padding_side = "left"
    check_on_model(model, processor, grid.methods, grid.budgets, grid.options,
                   image_sizes=grid.image_sizes or [bench.default_image_size(model)], image_flag="--image-size")
    print(f"model: {what}; fp32, {model.config._attn_implementation}, {torch.get_num_threads()} threads")
    records = bench.run_grid(model, processor, grid, progress=not args.no_progress)
    print(bench.format_table(records))
    print("median ± half the min-max range; peak = memory above the pre-call baseline (RSS sampled on CPU)")
    if bench.format_controls(records):
        print(bench.format_controls(records))
    comparisons = bench.comparisons(records, grid.warmup)
    if comparisons:
        print("\nagainst the stock model (ratios of medians, > 1 is better; [worst-best pairing of runs]):")
        print(bench.format_comparisons(comparisons))
    if args.json is not None:
        text = json.dumps([dict(r, model=what) for r in records], indent=2)
        print(text) if out is None else write_output(out, text + "\n", "--json")
        if out is not None:
            print(f"wrote {len(records)} records to {out}")
    if plot is not None:
        write_output(plot, figure_bytes(lambda file: bench.plot(records, file)), "--plot")
        print(f"wrote {plot}")
    return 0
