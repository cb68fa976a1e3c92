"""Pictures of which visual tokens a method kept: the base image and the high-resolution canvas.

    import tokendrop.viz as viz
    viz.show_selection(model, processor, image, "What is in the image?", [td.HiRED(budget=0.2)], "kept.png")

One row per method, two panels per row:
  - base image: the whole image squashed to one S x S tile, as the model encodes partition 0;
  - canvas: the image resized with its aspect kept into (rows*S, cols*S) pixels and centre padded
    (black, as the processor pads), tile borders drawn and numbered.
Kept patches are outlined, dropped ones dimmed; canvas tokens that unpadding removes (never
candidates) are striped, and the unpadded region (`Layout.crop`) is outlined dashed. The row title
gives the counts per partition: "base 32 | tiles 8/11/7/6 | total 64 of 320".

Figure size rule (so tests and docs can rely on it): DPI = 100, FIG_WIDTH_IN = 12.5 inches wide and
ROW_HEIGHT_IN = 4.5 inches per method, i.e. 1250 x (450 * methods) pixels whatever the image.

matplotlib is an optional dependency (`pip install tokendrop[plot]`); it is imported when drawing,
through `matplotlib.figure.Figure` and the Agg canvas, so no global pyplot backend is touched.

Dimension letters: G patches per tile side, S tile pixels, P partitions, K kept tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokendrop.methods.layout import Layout

DPI = 100
FIG_WIDTH_IN = 12.5
ROW_HEIGHT_IN = 4.5
_TITLE_BAND_IN = 0.75  # above the panels: row title, then the panel titles
_BASE_BOX_IN = (0.25, 3.55)  # (left, width) of the base panel
_CANVAS_BOX_IN = (4.2, 8.1)  # (left, width) of the canvas panel
_BOTTOM_IN = 0.15
DIM = 0.3  # brightness left to dropped patches
KEPT_COLOR = "#00e5ff"
TILE_COLOR = "#ffffff"
CROP_COLOR = "#ffd400"
LEGEND = ("cyan outline: kept    dimmed: dropped    black: padding pixels\n"
          "striped: removed by unpadding    white lines: tile borders    dashed yellow: unpadded region")


def figure_size(num_methods: int) -> tuple[int, int]:
    """(width, height) in pixels of the picture for `num_methods` rows."""
    return round(FIG_WIDTH_IN * DPI), round(ROW_HEIGHT_IN * DPI * num_methods)


def _figure_class():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("drawing kept tokens needs matplotlib: pip install matplotlib "
                          "(or pip install 'tokendrop[plot]')") from err
    return Figure, FigureCanvasAgg


def require_matplotlib() -> None:
    """Raise the ImportError with install advice now, before any slow work, if matplotlib is missing."""
    _figure_class()


# ---- geometry (same arithmetic as the stock processors) ------------------------------------------
def canvas_placement(image_size, tiles: tuple[int, int], tile_px: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) in pixels of the image inside the (rows*S, cols*S) canvas.

    As transformers' `get_patch_output_size` + `_pad_for_patching`: fit the long side, ceil the
    other (capped), paste at floor((canvas - size) / 2).
    """
    height, width = (int(x) for x in image_size)
    canvas_h, canvas_w = tiles[0] * tile_px, tiles[1] * tile_px
    if canvas_w / width < canvas_h / height:
        new_w, new_h = canvas_w, min(math.ceil(height * canvas_w / width), canvas_h)
    else:
        new_h, new_w = canvas_h, min(math.ceil(width * canvas_h / height), canvas_w)
    return (canvas_h - new_h) // 2, (canvas_w - new_w) // 2, new_h, new_w


def base_pixels(image: Image.Image, tile_px: int, squash: bool = True) -> np.ndarray:
    """(S, S, 3) uint8: partition 0 as the model sees it (squashed; or shortest-edge + centre crop)."""
    if squash:
        return np.asarray(image.resize((tile_px, tile_px), Image.BICUBIC))
    short, long = sorted(image.size)
    long = int(tile_px * long / short)  # transformers' get_resize_output_image_size
    w, h = (tile_px, long) if image.width <= image.height else (long, tile_px)
    left, top = (w - tile_px) // 2, (h - tile_px) // 2
    return np.asarray(image.resize((w, h), Image.BICUBIC).crop((left, top, left + tile_px, top + tile_px)))


def canvas_pixels(image: Image.Image, layout: Layout, tile_px: int) -> np.ndarray:
    """(rows*S, cols*S, 3) uint8: the image placed on the black-padded high-resolution canvas."""
    rows, cols = layout.tiles
    top, left, h, w = canvas_placement((image.height, image.width), layout.tiles, tile_px)
    canvas = np.zeros((rows * tile_px, cols * tile_px, 3), dtype=np.uint8)
    canvas[top : top + h, left : left + w] = np.asarray(image.resize((w, h), Image.BICUBIC))
    return canvas


def kept_masks(layout: Layout, selection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept tokens as grids: base (G, G) bool and canvas (rows*G, cols*G) bool.

    Args:
        selection: (K, 3) long (partition, row, col), as in `Handle.selections`.
    """
    g, (rows, cols) = layout.grid, layout.tiles
    sel = selection.long().cpu()
    sel = sel[sel[:, 1] >= 0]  # a fed [CLS] state (row -1) has no place on the grid
    base = torch.zeros(g, layout.cols, dtype=torch.bool)
    part0 = sel[sel[:, 0] == 0]
    base[part0[:, 1], part0[:, 2]] = True
    canvas = torch.zeros(rows * g, cols * g, dtype=torch.bool)
    tiles = sel[sel[:, 0] > 0]
    t = tiles[:, 0] - 1
    canvas[(t // max(cols, 1)) * g + tiles[:, 1], (t % max(cols, 1)) * g + tiles[:, 2]] = True
    return base, canvas


def partition_counts(layout: Layout, selection: torch.Tensor) -> list[int]:
    """Kept tokens per partition, base first."""
    return torch.bincount(selection[:, 0].long().cpu(), minlength=layout.num_partitions).tolist()


def count_line(layout: Layout, selection: torch.Tensor) -> str:
    """'base 32 | tiles 8/11/7/6 | total 64 of 320' (of all P*N patch tokens); 'kept 115 of 576' for a
    native-resolution grid (Qwen-VL)."""
    counts = partition_counts(layout, selection)
    if layout.grid_cols:
        return f"kept {counts[0]} of {layout.patches} ({layout.grid}x{layout.cols} tokens)"
    tiles = f" | tiles {'/'.join(map(str, counts[1:]))}" if layout.num_tiles else ""
    return f"base {counts[0]}{tiles} | total {sum(counts)} of {layout.num_partitions * layout.patches}"


# ---- drawing -------------------------------------------------------------------------------------
def _shade(pixels: np.ndarray, kept: torch.Tensor, valid: torch.Tensor, patch_px: int) -> np.ndarray:
    """Dim the dropped patches and stripe the invalid (unpadded-away) ones of an (H, W, 3) picture."""
    up = lambda m: np.kron(m.numpy().astype(np.uint8), np.ones((patch_px, patch_px), np.uint8)).astype(bool)
    kept_px, valid_px = up(kept), up(valid)  # (H, W)
    out = pixels.astype(np.float32)
    out[~kept_px] *= DIM
    yy, xx = np.mgrid[: out.shape[0], : out.shape[1]]
    stripes = ((xx + yy) // 4) % 3 == 0
    out[~valid_px & stripes] = 110.0
    return out.clip(0, 255).astype(np.uint8)


def _outline_kept(ax, kept: torch.Tensor, patch_px: int, linewidth: float) -> None:
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    rects = [Rectangle((c * patch_px, r * patch_px), patch_px, patch_px) for r, c in kept.nonzero().tolist()]
    ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor=KEPT_COLOR, linewidth=linewidth))


def _setup(ax, pixels: np.ndarray, title: str) -> None:
    ax.imshow(pixels, extent=(0, pixels.shape[1], pixels.shape[0], 0), interpolation="nearest")
    ax.set_xlim(0, pixels.shape[1])
    ax.set_ylim(pixels.shape[0], 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def _draw_base(ax, image, layout, kept, tile_px, squash) -> None:
    patch_px = tile_px // layout.grid
    if layout.grid_cols:  # a native-resolution grid: the image resized to rows x cols tokens
        size = (layout.cols * patch_px, layout.grid * patch_px)
        pixels = _shade(np.asarray(image.resize(size, Image.BICUBIC)), kept, torch.ones_like(kept), patch_px)
        _setup(ax, pixels, f"image (resized to {size[0]}x{size[1]} px, {patch_px} px per token): "
                           f"{int(kept.sum())} of {layout.patches} kept")
        _outline_kept(ax, kept, patch_px, linewidth=0.8)
        return
    pixels = _shade(base_pixels(image, tile_px, squash), kept, torch.ones_like(kept), patch_px)
    how = "squashed" if squash else "centre-cropped"
    _setup(ax, pixels, f"base image ({how} to {tile_px}x{tile_px} px): {int(kept.sum())} of {layout.patches} kept")
    _outline_kept(ax, kept, patch_px, linewidth=0.8)


def _draw_canvas(ax, image, layout, kept, counts, tile_px) -> None:
    from matplotlib.patches import Rectangle

    g, (rows, cols) = layout.grid, layout.tiles
    patch_px = tile_px // g
    valid = layout.canvas_valid()
    pixels = _shade(canvas_pixels(image, layout, tile_px), kept, valid, patch_px)
    title = (f"canvas {rows}x{cols} tiles ({cols * tile_px}x{rows * tile_px} px): "
             f"{sum(counts[1:])} of {int(valid.sum())} unpadded kept")
    _setup(ax, pixels, title)
    _outline_kept(ax, kept, patch_px, linewidth=0.6)
    for r in range(1, rows):
        ax.axhline(r * tile_px, color=TILE_COLOR, linewidth=1.6)
    for c in range(1, cols):
        ax.axvline(c * tile_px, color=TILE_COLOR, linewidth=1.6)
    if not bool(valid.all()):  # outline what survives unpadding
        top, bottom, left, right = (x * patch_px for x in layout.crop)
        ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor=CROP_COLOR,
                               linewidth=1.4, linestyle=(0, (4, 3))))
    for t in range(layout.num_tiles):
        ax.text((t % cols) * tile_px + 3, (t // cols) * tile_px + 3, f"{t + 1}: {counts[t + 1]}", color="black",
                fontsize=8, va="top", ha="left", bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))


def _draw_row(fig, row: int, num_rows: int, image, layout, label, selection, tile_px) -> None:
    height = ROW_HEIGHT_IN * num_rows
    row_top = height - row * ROW_HEIGHT_IN  # inches from the figure bottom
    panel_h = ROW_HEIGHT_IN - _TITLE_BAND_IN - _BOTTOM_IN
    bottom = row_top - ROW_HEIGHT_IN + _BOTTOM_IN

    def axes(left_in, width_in):
        rect = (left_in / FIG_WIDTH_IN, bottom / height, width_in / FIG_WIDTH_IN, panel_h / height)
        return fig.add_axes(rect, anchor="NW")  # equal aspect shrinks the box; keep it under its title

    fig.text(0.25 / FIG_WIDTH_IN, (row_top - 0.12) / height, f"{label}    {count_line(layout, selection)}",
             fontsize=11, fontweight="bold", va="top", ha="left")
    if row == 0:
        fig.text(1 - 0.15 / FIG_WIDTH_IN, (row_top - 0.12) / height, LEGEND, fontsize=8, color="0.35", va="top", ha="right")
    base_kept, canvas_kept = kept_masks(layout, selection)
    box = (_BASE_BOX_IN[0], _BASE_BOX_IN[1] + _CANVAS_BOX_IN[1]) if layout.grid_cols else _BASE_BOX_IN  # the whole row
    _draw_base(axes(*box), image, layout, base_kept, tile_px, squash=layout.num_tiles > 0)
    if layout.num_tiles:
        _draw_canvas(axes(*_CANVAS_BOX_IN), image, layout, canvas_kept, partition_counts(layout, selection), tile_px)
    elif not layout.grid_cols:
        fig.text((_CANVAS_BOX_IN[0] + 0.2) / FIG_WIDTH_IN, (bottom + panel_h / 2) / height,
                 "single-partition model: no high-resolution canvas", fontsize=10, va="center")


def draw(image: Image.Image, layout: Layout, rows, tile_px: int):
    """The picture as a matplotlib `Figure` (Agg canvas attached), one row per (label, selection).

    Args:
        image: the input image (converted to RGB).
        layout: its `Layout` (from `tokendrop.registry.family_for(model).layout((height, width))`).
        rows: sequence of (label, selection) with selection a (K, 3) long (partition, row, col) tensor.
        tile_px: S, pixels per tile side (config.vision_config.image_size); a multiple of layout.grid.
            For a native-resolution grid (Qwen-VL), the pixels of its `grid` rows of tokens.
    """
    Figure, FigureCanvasAgg = _figure_class()
    rows = list(rows)
    if not rows:
        raise ValueError("draw() needs at least one (label, selection) row")
    if tile_px % layout.grid:
        raise ValueError(f"tile_px must be a multiple of the patch grid {layout.grid}, got {tile_px}")
    fig = Figure(figsize=(FIG_WIDTH_IN, ROW_HEIGHT_IN * len(rows)), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    image = image.convert("RGB")
    for i, (label, selection) in enumerate(rows):
        _draw_row(fig, i, len(rows), image, layout, label, selection, tile_px)
    return fig


def to_image(fig) -> Image.Image:
    """Render a figure from `draw()` to an RGB PIL image of `figure_size(rows)` pixels."""
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


# ---- from a model --------------------------------------------------------------------------------
def method_label(method) -> str:
    """Short name of a method: its class and the fields not at their defaults, e.g. 'HiRED(budget=0.2)'."""
    from dataclasses import MISSING, fields, is_dataclass

    parts = []
    for f in fields(method) if is_dataclass(method) else ():
        value = getattr(method, f.name)
        if f.default is MISSING or f.default != value:
            plain = value is None or isinstance(value, (bool, int, str, tuple))
            shown = f"{value:g}" if isinstance(value, float) else repr(value) if plain else f"<{type(value).__name__}>"
            parts.append(f"{f.name}={shown}")  # a model option (CDPruner's clip) by its class, not its repr
    return f"{type(method).__name__}({', '.join(parts)})"


def select_tokens(model, processor, image: Image.Image, prompt: str, method) -> torch.Tensor:
    """(K, 3) kept (partition, row, col) of `image` under `method`: one forward pass, model restored after."""
    from tokendrop.api import apply
    from tokendrop.loading import format_prompt

    with apply(model, processor, method) as handle, torch.inference_mode():
        # the patched processor writes the method's placeholder count
        inputs = processor(images=image, text=format_prompt(processor, prompt), return_tensors="pt")
        model(**inputs.to(model.device))
        return handle.selections[0].cpu()


def collect(model, processor, image: Image.Image, prompt: str, methods) -> list[tuple[str, torch.Tensor]]:
    """(label, (K, 3) selection) for every method; `methods` is a list of instances or a dict {label: method}."""
    items = list(methods.items()) if isinstance(methods, dict) else [(method_label(m), m) for m in methods]
    if not items:
        raise ValueError("methods must name at least one pre-LLM method, e.g. [td.HiRED(budget=0.2)]")
    return [(label, select_tokens(model, processor, image, prompt, m)) for label, m in items]


def show_selection(model, processor, image, prompt: str, methods, out_path=None) -> Image.Image:
    """Draw the tokens each method keeps of `image` on `model`; save a PNG to `out_path` if given.

    Args:
        image: a PIL image or a path to one.
        prompt: the question; wrapped by `tokendrop.loading.format_prompt` unless it holds the image token.
        methods: pre-LLM method instances (td.HiRED(budget=0.2), ...), or a dict {label: method}.
    Returns:
        the picture, `figure_size(len(methods))` pixels.
    """
    from tokendrop.data.images import open_image
    from tokendrop.registry import family_for

    require_matplotlib()
    image = open_image(image) if isinstance(image, (str, Path)) else image.convert("RGB")
    rows = collect(model, processor, image, prompt, methods)
    family = family_for(model)
    layout = family.processor_geometry(processor).layout((image.height, image.width))
    fig = draw(image, layout, rows, family.token_pixels() * layout.grid)
    if out_path is not None:
        fig.savefig(out_path, dpi=DPI, format="png")
    return to_image(fig)
