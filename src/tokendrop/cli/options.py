"""The options every subcommand shares, spelled one way: methods, budgets, method options, outputs.

    --method hired,pdrop          comma list of method names or a+b compositions (`tokendrop methods`)
    --budget 0.1,0.2              pre-LLM budgets, one configuration each
    --method-args alpha=0.5,variant=official,layers=[8,16,24]
                                  the methods' own options (their dataclass fields), lmms-eval style:
                                  a key applies to every listed method that has it; pdrop.ratio=0.4
                                  to one
    --json PATH, --batch-size N, --max-new-tokens N

Parsing turns every bad value into a `UsageError` naming the flag, before anything is loaded.
Output paths are tried for writing at the same time (`output_path`, `output_folder`); a write that
fails later anyway (a full disk) is a `UsageError` naming the flag and the file (`write_output`),
after what was already shown or written: it is the user's disk, not tokendrop's bug.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from tokendrop.cli import UsageError


@contextlib.contextmanager
def flag(name: str):
    """Turn the ValueError / TypeError / OSError of validating a user's value (or reading the user's
    file) into a UsageError naming `name`. Wrap only the call that validates: around anything else
    it would disguise a bug as a usage error."""
    try:
        yield
    except (ValueError, TypeError, OSError) as err:
        raise UsageError(f"{name}: {err}") from None


def comma_list(text: str | None, what: str) -> list[str]:
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    if not items:
        raise UsageError(f"{what} must list at least one value, got {text!r}")
    return items


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


def one_int(text, what: str, low: int = 0) -> int | None:
    return None if text is None else parse_ints(str(text), what, low=low)[0]


def parse_budgets(text: str) -> list[float]:
    """'0.1,0.2' -> [0.1, 0.2], each checked by the methods' own rule for a budget."""
    from tokendrop.methods.base import check_budget

    budgets = []
    for item in comma_list(text, "--budget"):
        try:
            value = float(item)
        except ValueError:
            raise UsageError(f"--budget must be comma-separated numbers in (0, 1], got {item!r}") from None
        try:
            budgets.append(check_budget(value))
        except ValueError as err:  # "budget must be in (0, 1], ..." names the field: the flag is --budget
            raise UsageError(f"--{err}") from None
    return budgets


def parse_image_sizes(text: str) -> list[tuple[int, int]]:
    """'672x672,1000x700' -> [(672, 672), (1000, 700)] as (height, width)."""
    sizes = []
    for item in comma_list(text, "--image-size"):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UsageError(f"--image-size must be HEIGHTxWIDTH in pixels (e.g. 672x672), got {item!r}")
        sizes.append((int(parts[0]), int(parts[1])))
    return sizes


# ---- methods ------------------------------------------------------------------------------------------
def add_method_options(p, default: str, budget: str = "0.2") -> None:
    """--method, --budget, --method-args."""
    from tokendrop.registry import VANILLA, control_names, method_names

    controls = f"; or a model's own setting for fewer tokens, as a control: {', '.join(control_names())}" if control_names() else ""
    p.add_argument("--method", default=default,
                   help=f"comma list of methods: {', '.join([VANILLA, *method_names()])}, or a+b compositions "
                        f"such as hired+pdrop{controls}; `tokendrop methods` lists them with their options "
                        "(default: %(default)s)")
    p.add_argument("--budget", default=budget,
                   help="comma list of budgets in (0, 1] for pre-LLM methods, one configuration each (default: %(default)s)")
    p.add_argument("--method-args", default=None, metavar="KEY=VALUE,...",
                   help="method options, e.g. alpha=0.5,variant=official or layers=[8,16,24],ratio=0.4; a key applies "
                        "to every listed method that has it, pdrop.ratio=0.4 to one (see `tokendrop methods`)")


def method_configs(args) -> tuple[list[str], list[float], dict]:
    """(method names, budgets, options) from --method, --budget, --method-args, every one validated.

    Each configuration is built once here with its options, so a bad name, budget or option fails
    now, naming the flag, and not when its configuration comes up.
    """
    from tokendrop.registry import build_run, check_options, configurations

    budgets = parse_budgets(args.budget)
    with flag("--method"):
        names = comma_list(args.method, "--method")
        configs = configurations(names, budgets)
    options = method_options(args.method_args)
    with flag("--method-args"):
        check_options(names, options)
        for name, budget in configs:
            build_run(name, budget=budget, **options)
    return names, budgets, options


def method_options(text: str | None) -> dict:
    """--method-args parsed; the budget is refused there: it has its own flag, one configuration each."""
    from tokendrop.registry import parse_options

    with flag("--method-args"):
        options = parse_options(text)
    for key, value in options.items():
        if key.rpartition(".")[2] == "budget":
            raise UsageError(f"--method-args: the budget is not a method option; give it as --budget {value} "
                             f"(a comma list runs one configuration per budget)")
    return options


def check_on_model(model, processor, names: list[str], budgets: list[float], options: dict, image_sizes=(),
                   image_flag: str = "--image") -> None:
    """Every configuration checked against the loaded model as `apply()` checks it (its family's
    capabilities, its depth) and, for every (height, width) in `image_sizes`, the tokens its pre-LLM
    part keeps: none is the library's error (with the smallest budget that keeps one), now and not
    when the processor meets that image. `image_flag` names where the images come from (`--data`)."""
    from tokendrop import controls
    from tokendrop.families.base import Control, TokenCount
    from tokendrop.api import check
    from tokendrop.registry import build_run, configurations

    sizes = list(dict.fromkeys(tuple(size) for size in image_sizes))
    for name, budget in configurations(names, budgets):
        run = build_run(name, budget=budget, **options)
        if isinstance(run, Control):  # its family, and a setting at this budget
            with flag(f"--method {name}"):
                controls.check(model, processor, run)
            continue
        with flag(f"--method {name}"):
            family, pre, _ = check(model, processor, *run)
        if pre is None:
            continue
        count = TokenCount(family.processor_geometry(processor), pre)  # what the patched processor writes
        for size in sizes:
            with flag(f"{image_flag} ({size[0]}x{size[1]} pixels)"):
                layout = count.geometry.layout(size)
            with flag("--budget"):
                count.count(layout, size)


def label(name: str, budget: float | None) -> str:
    return name if budget is None else f"{name}@{budget:g}"


# ---- outputs ---------------------------------------------------------------------------------------------
def add_json(p, what: str) -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help=f"write {what} as JSON to PATH (no PATH or '-': print it instead of the table)")


def output_path(path: str | None, name: str, suffix: str | None = None) -> Path | None:
    """Check an output path before any work: its folder exists, the suffix when one is required, and
    the file can be opened for writing (`probe_writable`). None for no path or '-' (standard output)."""
    if path is None or path == "-":
        return None
    out = Path(path)
    if suffix is not None and out.suffix.lower() != suffix:
        raise UsageError(f"{name} must be a {suffix} file, got {path!r}")
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"{name} {path}: {out.parent} is not a folder")
    if not out.parent.is_dir():
        raise UsageError(f"{name} {path}: folder {out.parent} does not exist")
    if out.is_dir():
        raise UsageError(f"{name} {path} is a folder; give a file path")
    try:
        probe_writable(out)
    except OSError as err:
        raise UsageError(f"{name} {path}: cannot write there ({err.strerror or err})") from None
    return out


def probe_writable(out: Path) -> None:
    """OSError if `out` cannot be opened for writing, found by trying, since permission bits do not
    tell (root ignores them; /sys and read-only mounts refuse anyway). An existing file is opened
    for appending and closed, its content and times untouched; a new one is created and removed."""
    if out.exists():
        if stat.S_ISFIFO(out.stat().st_mode):
            return  # opening a pipe for writing waits for its reader
        os.close(os.open(out, os.O_WRONLY | os.O_APPEND))
        return
    os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    out.unlink()


def output_folder(path: str, name: str) -> Path:
    """Check an output folder before any work: created if missing (with its parents), and a file can
    be created in it (tried with a temporary file). On failure the folders it made are removed."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{name} {path} exists and is not a folder")
    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise UsageError(f"{name} {path}: cannot write there ({err.strerror or err})") from None
    return out


def write_output(out: Path, data: str | bytes, name: str, note: str = "") -> None:
    """Write a finished output to `out` (a path checked by `output_path`). A write that fails anyway (a
    full disk, a file that changed since the check) is a UsageError naming `name` and the file (then
    `note`, e.g. where the results are): the user's disk, not tokendrop's bug. Wraps nothing but the write."""
    try:
        if isinstance(data, bytes):
            out.write_bytes(data)
        else:
            out.write_text(data)
    except OSError as err:
        raise UsageError(f"{name} {out}: could not write it ({err.strerror or err}){note}") from None


def figure_bytes(draw) -> bytes:
    """The PNG that `draw(file)` saves (a function taking a path or file for matplotlib's savefig),
    made in memory, so that only `write_output` touches the user's file."""
    import io

    buffer = io.BytesIO()
    draw(buffer)
    return buffer.getvalue()


def require_matplotlib(name: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"{name} needs matplotlib: pip install 'tokendrop[plot]'") from None


def load_model_flag(spec: str | None, seed: int = 0, device=None):
    """(model, processor, note) for the --model flag (None: the bundled model); a bad id or folder is a
    UsageError naming the flag. The library's loader is `tokendrop.loading.load_model`."""
    from tokendrop.loading import ModelLoadError, load_default

    try:
        return load_default(spec, seed=seed, device=device)
    except ModelLoadError as err:
        raise UsageError(f"--model: {err}") from None


def model_config(spec: str | None):
    """The config of the --model flag's checkpoint (None: the bundled one), read without its weights;
    None for the tiny random model (built in a moment: checked once built). A bad id or folder is the
    loader's UsageError."""
    from tokendrop.loading import TINY, ModelLoadError, bundled_model_path, load_config

    path = bundled_model_path() if spec is None else spec
    if path is None or path == TINY:
        return None
    try:
        return load_config(str(path))
    except ModelLoadError as err:
        raise UsageError(f"--model: {err}") from None


def check_on_config(spec: str | None, names: list[str], budgets: list[float], options: dict) -> None:
    """Every configuration checked against the --model checkpoint's config before its weights load
    (`Family.config_check`: the capabilities each method needs, in-LLM layers within the LM's depth,
    the vision blocks pre-LLM scores come from), with the messages `check_on_model` gives after."""
    from tokendrop.families import family_of
    from tokendrop.registry import build_methods, check_control, configurations, control_names

    config = model_config(spec)
    if config is None:
        return
    try:
        family = family_of(architecture=(config.architectures or [None])[0])
    except ValueError:
        return  # not a supported model: the loader says so, before any weight
    for name, budget in configurations(names, budgets):
        if name.strip().lower() in control_names():
            with flag(f"--method {name}"):
                check_control(family, name.strip().lower())
            continue
        with flag(f"--method {name}"):
            for method in build_methods(name, budget=budget, **options):
                family.config_check(config, method)
