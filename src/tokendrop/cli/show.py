"""`tokendrop show`: draw the tokens a method keeps over the base image and the high-resolution canvas.

    tokendrop show --image photo.png --prompt "What is written on the sign?" --method hired,random \\
        --budget 0.2 --out kept.png

Defaults: the bundled model and sample image when the package ships them, else a tiny random
model and a generated image (announced; a random model's choices show the geometry, not meaning).
The picture is `tokendrop.viz.figure_size(methods)` pixels: 1250 wide, 450 per method.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_PROMPT = "What is in the image?"
METHOD_NAMES = ("hired", "hired-official", "random", "spatial", "base-only")  # pre-LLM: what a picture can show


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("show", help="draw the visual tokens a method keeps (PNG)")
    p.add_argument("--model", default=None,
                   help="model folder or Hugging Face id; 'tiny' for a tiny random model "
                        "(default: the bundled model if installed, else 'tiny')")
    p.add_argument("--image", default=None, help="image file (default: the bundled sample, else a generated image)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"question about the image (default {DEFAULT_PROMPT!r})")
    p.add_argument("--method", default="hired",
                   help=f"comma-separated methods, one row each: {', '.join(METHOD_NAMES)} (default hired)")
    p.add_argument("--budget", type=float, default=0.2, help="fraction of visual tokens kept (default 0.2)")
    p.add_argument("--alpha", type=float, default=0.5, help="HiRED's share of the budget for the base image (default 0.5)")
    p.add_argument("--out", required=True, help="output PNG file")


def parse_methods(text: str, budget: float, alpha: float) -> dict:
    """{label: method} from 'hired,random'; UsageError naming the unknown name and the choices.

    Pre-LLM names come from `tokendrop.registry`. In-LLM
    methods (pdrop, fastv) drop inside the LLM, after the picture this command draws.
    """
    from tokendrop.cli import UsageError
    from tokendrop.registry import IN_LLM, build_methods
    from tokendrop.viz import method_label

    methods = {}
    for name in (part.strip().lower() for part in text.split(",")):
        if any(part.strip() in IN_LLM for part in name.split("+")):
            raise UsageError(f"--method {name!r}: show draws the tokens kept before the LLM; in-LLM methods "
                             f"({', '.join(IN_LLM)}) drop later, inside it. Available: {', '.join(METHOD_NAMES)}")
        if name not in METHOD_NAMES:
            close = difflib.get_close_matches(name, METHOD_NAMES, n=1)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"unknown method {name!r} in --method. {hint}Available: {', '.join(METHOD_NAMES)}")
        method = build_methods(name, budget=budget, alpha=alpha)[0]
        methods[f"{name}: {method_label(method)}"] = method
    return methods


def load_model(spec: str | None):
    """(model, processor, description) for --model; the bundled model or the tiny one by default."""
    from tokendrop.cli import UsageError

    bundled = ASSETS / "model"
    if spec is None:
        if not (bundled / "config.json").is_file():
            print(f"note: no bundled model at {bundled}; using a tiny random model (its choices show geometry only)")
            spec = "tiny"
        else:
            spec = str(bundled)
    if spec == "tiny":
        from tokendrop.tiny import tiny_llava_next

        model, processor = tiny_llava_next()
        return model, processor, "tiny random LLaVA-NeXT"
    from tokendrop.loading import load_model as load_pretrained

    if Path(spec).expanduser().is_absolute() or spec.startswith(".") or Path(spec).exists():
        if not (Path(spec).expanduser() / "config.json").is_file():
            raise UsageError(f"--model {spec} is not a model folder (no config.json there)")
    try:
        model, processor = load_pretrained(spec)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load model {spec!r}: {reason}") from err
    return model, processor, spec


def load_image(path: str | None):
    """(RGB image, description) for --image; the bundled sample or a generated image by default."""
    from PIL import Image

    from tokendrop.cli import UsageError

    if path is None:
        sample = ASSETS / "sample.png"
        if sample.is_file():
            path = str(sample)
        else:
            from tokendrop.data.synth import make_sample

            image, record = make_sample(0, 1)  # a 2x2-tile scene
            print(f"note: no bundled sample at {sample}; using a generated {image.width}x{image.height} image")
            return image.convert("RGB"), f"generated sample {record['id']}"
    try:
        with Image.open(path) as image:
            return image.convert("RGB"), path
    except (OSError, ValueError) as err:  # missing, a folder, not an image, truncated
        reason = getattr(err, "strerror", None) or str(err).replace(f"'{path}'", "").strip() or type(err).__name__
        raise UsageError(f"cannot read image {path}: {reason}") from err


def _check_out(out: str) -> Path:
    from tokendrop.cli import UsageError

    path = Path(out)
    if path.suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png file, got {out!r}")
    if not path.parent.is_dir():
        raise UsageError(f"--out folder {path.parent} does not exist")
    return path


def run(args) -> int:
    from tokendrop import viz
    from tokendrop.adapters import adapter_for

    out = _check_out(args.out)
    methods = parse_methods(args.method, args.budget, args.alpha)
    image, image_name = load_image(args.image)
    try:
        viz.require_matplotlib()
    except ImportError as err:  # a missing optional dependency: one line, not a traceback
        print(f"tokendrop show: error: {err}", file=sys.stderr)
        return 1
    model, processor, model_name = load_model(args.model)
    rows = viz.collect(model, processor, image, args.prompt, methods)
    layout = adapter_for(model).layout((image.height, image.width))
    fig = viz.draw(image, layout, rows, model.config.vision_config.image_size)
    fig.savefig(out, dpi=viz.DPI, format="png")
    print(f"model {model_name}; image {image_name} ({image.width}x{image.height} px, "
          f"{layout.tiles[0]}x{layout.tiles[1]} tiles of {layout.grid}x{layout.grid} patches)")
    for label, selection in rows:
        print(f"{label}: {viz.count_line(layout, selection)}")
    width, height = viz.figure_size(len(rows))
    print(f"wrote {out} ({width}x{height} px)")
    return 0
