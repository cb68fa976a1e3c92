"""`tokendrop show`: draw the tokens a method keeps over the base image and the high-resolution canvas.

    tokendrop show --image photo.png --prompt "What is written on the sign?" --method hired,random \\
        --budget 0.2 --out kept.png

Defaults: the bundled model and sample image when the package ships them, else a tiny random
model and a generated image (announced; a random model's choices show the geometry, not meaning).
The picture is `tokendrop.viz.figure_size(methods)` pixels: 1250 wide, 450 per method.
"""

from __future__ import annotations

from tokendrop.cli import UsageError
from tokendrop.cli.options import (add_method_options, check_on_config, check_on_model, comma_list, figure_bytes, flag, method_options,
                                   output_path, parse_budgets, require_matplotlib, write_output)

DEFAULT_PROMPT = "What is in the image?"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("show", help="draw the visual tokens pre-LLM methods keep (PNG)")
    p.add_argument("--model", default=None, help="model folder or Hugging Face id; 'tiny' for a tiny random model "
                                                 "(default: the bundled model if installed, else 'tiny')")
    p.add_argument("--image", default=None, help="image file (default: the bundled sample, else a generated image)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"question about the image (default {DEFAULT_PROMPT!r})")
    add_method_options(p, default="hired")
    p.add_argument("--out", required=True, help="output PNG file")


def parse_methods(text: str, budget: float, options: dict | None = None) -> dict:
    """{label: method} from 'hired,random', one row each: pre-LLM methods only (in-LLM ones drop
    later, inside the LLM, after the picture this command draws). UsageError naming the problem."""
    from tokendrop.registry import build_methods, method_class, method_names, split_name
    from tokendrop.viz import method_label

    drawable = [n for n in method_names() if method_class(n).stage == "pre"]
    methods = {}
    for name in comma_list(text, "--method"):
        with flag("--method"):
            parts = split_name(name)
        if len(parts) != 1 or parts[0] not in drawable:
            raise UsageError(f"--method {name!r}: show draws the tokens kept before the LLM; in-LLM methods drop "
                             f"later, inside it. Available: {', '.join(drawable)}")
        with flag("--method-args"):
            method = build_methods(parts[0], budget=budget, **(options or {}))[0]
        methods[f"{parts[0]}: {method_label(method)}"] = method
    return methods


def run(args) -> int:
    from tokendrop import viz
    from tokendrop.demo import load_demo_image
    from tokendrop.registry import check_options, family_for

    out = output_path(args.out, "--out", suffix=".png")
    options, budgets = method_options(args.method_args), parse_budgets(args.budget)
    methods = {}
    for budget in budgets:  # one row per method and budget
        methods.update(parse_methods(args.method, budget, options))
    names = comma_list(args.method, "--method")
    with flag("--method-args"):
        check_options(names, options)  # a key no listed method has: as `run` refuses it
    if not args.prompt.strip():
        raise UsageError("--prompt must not be empty")
    require_matplotlib("show")
    with flag("--image"):
        image, _, image_note = load_demo_image(args.image, args.prompt)
    from tokendrop.cli.options import load_model_flag

    check_on_config(args.model, names, budgets, options)  # before minutes of loading weights
    model, processor, note = load_model_flag(args.model)
    model_name = note or args.model
    family = family_for(model)
    if "pre_llm" not in family.capabilities():
        raise UsageError(f"--model: {family.name} models have no pre-LLM dropping to draw")
    check_on_model(model, processor, names, budgets, options, image_sizes=[(image.height, image.width)])
    rows = viz.collect(model, processor, image, args.prompt, methods)
    layout = family.processor_geometry(processor).layout((image.height, image.width))
    fig = viz.draw(image, layout, rows, family.token_pixels() * layout.grid)
    write_output(out, figure_bytes(lambda file: fig.savefig(file, dpi=viz.DPI, format="png")), "--out")
    grid = (f"{layout.grid}x{layout.cols} tokens" if layout.grid_cols else
            f"{layout.tiles[0]}x{layout.tiles[1]} tiles of {layout.grid}x{layout.grid} patches")
    print(f"model {model_name}; image {args.image or image_note} ({image.width}x{image.height} px, {grid})")
    for label, selection in rows:
        print(f"{label}: {viz.count_line(layout, selection)}")
    width, height = viz.figure_size(len(rows))
    print(f"wrote {out} ({width}x{height} px)")
    return 0
