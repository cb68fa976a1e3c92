"""Training targets derived from the synthetic scene metadata (``objects`` in questions.jsonl).

1. [CLS] multi-label targets per view (the base image and each anyres tile, in the processor's order):
   which shapes, colours, (colour, shape) pairs and glyphs are visible in that view. Glyphs are
   never asked of the base view (masked out): they are too small to see there.
2. Extra question/answer turns about the same image, to get more language-model supervision out
   of each (expensive) image forward pass, and a caption turn listing every object from left to
   right (as LLaVA's alignment stage uses captions): dense supervision that makes the language
   model look at each object in turn.
3. Per-patch classes (colour, shape, glyph) for the tower, the word alignment of the projector,
   and the grounding of each question: which patches its answer must look at (``focus_mask``).
"""

from __future__ import annotations

import math

import numpy as np

from tokendrop.data.synth import COLORS, GLYPHS, SHAPES, TEMPLATES

from recipes.default_model.model import pinpoints

LABELS = (
    [f"shape:{s}" for s in SHAPES]
    + [f"color:{c}" for c in COLORS]
    + [f"pair:{c} {s}" for c in COLORS for s in SHAPES]
    + [f"glyph:{g}" for g in GLYPHS]
)
_INDEX = {name: k for k, name in enumerate(LABELS)}
_GLYPH_SLICE = slice(_INDEX[f"glyph:{GLYPHS[0]}"], _INDEX[f"glyph:{GLYPHS[-1]}"] + 1)
_MIN_OVERLAP = 0.4  # an object counts as visible in a tile if this share of its box is inside
_GLYPH_MARGIN = 4.0  # glyph centre this far (tile pixels) inside a tile: label; closer to an edge: ignore


def best_resolution(height: int, width: int, tile: int) -> tuple[int, int]:
    """LLaVA-NeXT's choice of (height, width) among the pinpoints (same rule as transformers)."""
    best, best_eff, best_waste = None, 0, math.inf
    for th, tw in pinpoints(tile):
        scale = min(tw / width, th / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = th * tw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (th, tw), eff, waste
    return best


def _tile_transform(height: int, width: int, tile: int) -> tuple[float, float, float, int, int]:
    """(scale_x, scale_y, pad_x, pad_y) mapping image pixels to the padded grid canvas, plus rows/cols."""
    th, tw = best_resolution(height, width, tile)
    sx, sy = tw / width, th / height
    if sx < sy:
        new_w, new_h = tw, min(math.ceil(height * sx), th)
    else:
        new_h, new_w = th, min(math.ceil(width * sy), tw)
    scale_x, scale_y = new_w / width, new_h / height
    pad_x, pad_y = (tw - new_w) // 2, (th - new_h) // 2
    return scale_x, scale_y, pad_x, pad_y, th // tile, tw // tile


def _overlap(box: tuple, cell: tuple) -> float:
    x0, y0 = max(box[0], cell[0]), max(box[1], cell[1])
    x1, y1 = min(box[2], cell[2]), min(box[3], cell[3])
    area = (box[2] - box[0]) * (box[3] - box[1])
    return max(0.0, x1 - x0) * max(0.0, y1 - y0) / max(area, 1e-6)


def _mark(target: np.ndarray, obj: dict) -> None:
    for name in (f"shape:{obj['shape']}", f"color:{obj['color']}", f"pair:{obj['color']} {obj['shape']}"):
        target[_INDEX[name]] = 1.0


def view_targets(objects: list[dict], height: int, width: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label targets and loss masks for the base view and each tile.

    Args:
        objects: scene objects (``shape``, ``color``, ``glyph``, ``box`` in image pixels).
        height, width: image size in pixels.
        tile: tile side of the processor.

    Returns:
        targets (V, K) and mask (V, K) float arrays, V = 1 + rows*cols views (base first, tiles
        row-major as the processor orders them), K = len(LABELS).
    """
    sx, sy, px, py, rows, cols = _tile_transform(height, width, tile)
    targets = np.zeros((1 + rows * cols, len(LABELS)), dtype=np.float32)
    mask = np.ones_like(targets)
    mask[0, _GLYPH_SLICE] = 0.0  # 1. base view: everything but glyphs
    for obj in objects:
        _mark(targets[0], obj)
    for r in range(rows):  # 2. tiles: objects mostly inside, glyphs whose centre is well inside
        for c in range(cols):
            v = 1 + r * cols + c
            cell = (c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)
            for obj in objects:
                x0, y0, x1, y1 = obj["box"]
                box = (x0 * sx + px, y0 * sy + py, x1 * sx + px, y1 * sy + py)
                if _overlap(box, cell) >= _MIN_OVERLAP:
                    _mark(targets[v], obj)
                if obj.get("glyph"):
                    gx, gy = (box[0] + box[2]) / 2 - cell[0], (box[1] + box[3]) / 2 - cell[1]
                    inside = min(gx, gy, tile - gx, tile - gy)
                    if inside >= _GLYPH_MARGIN:
                        targets[v, _INDEX[f"glyph:{obj['glyph']}"]] = 1.0
                    elif inside > -_GLYPH_MARGIN:
                        mask[v, _GLYPH_SLICE] = 0.0  # glyph cut by the tile edge: no glyph target
    return targets, mask


CAPTION_QUESTION = "What is in the image?"


def caption(objects: list[dict]) -> str:
    """Objects from left to right: ``"red circle 7, blue square, green triangle"``."""
    ordered = sorted(objects, key=lambda o: (o["box"][0] + o["box"][2], o["box"][1] + o["box"][3]))
    parts = [f"{o['color']} {o['shape']}" + (f" {o['glyph']}" if o.get("glyph") else "") for o in ordered]
    return ", ".join(parts)


def extra_turns(objects: list[dict], rng: np.random.Generator, k: int) -> list[tuple[str, str]]:
    """Up to ``k`` further (question, answer) pairs that the scene answers unambiguously."""
    pairs = [(o["color"], o["shape"]) for o in objects]
    shape_counts = {s: sum(1 for o in objects if o["shape"] == s) for s in SHAPES}
    pool: list[tuple[str, str]] = []
    for o in objects:
        if o.get("glyph") and pairs.count((o["color"], o["shape"])) == 1:
            pool.append((TEMPLATES["glyph"].format(color=o["color"], shape=o["shape"]), o["glyph"]))
        if shape_counts[o["shape"]] == 1:
            pool.append((TEMPLATES["color"].format(shape=o["shape"]), o["color"]))
    for s, n in shape_counts.items():
        if n:
            pool.append((TEMPLATES["count"].format(shape=s), str(n)))
    color, shape = pairs[int(rng.integers(len(pairs)))]
    pool.append((TEMPLATES["exists"].format(color=color, shape=shape), "yes"))
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in pairs]
    near = [(c, s) for c, s in absent if any(s == ps for _, ps in pairs)]  # like the data: a near miss
    color, shape = (near or absent)[int(rng.integers(len(near or absent)))]
    pool.append((TEMPLATES["exists"].format(color=color, shape=shape), "no"))
    order = rng.permutation(len(pool))
    return [pool[int(i)] for i in order[:k]]


def _focus_table() -> dict[str, tuple[str | None, str]]:
    table = {}
    for s in SHAPES:
        for c in COLORS:
            table[TEMPLATES["glyph"].format(color=c, shape=s)] = (c, s)
            table[TEMPLATES["exists"].format(color=c, shape=s)] = (c, s)
        table[TEMPLATES["color"].format(shape=s)] = (None, s)
        table[TEMPLATES["count"].format(shape=s)] = (None, s)
    return table


_FOCUS = _focus_table()


def focus(question: str) -> tuple[str | None, str] | None:
    """The (colour or None, shape) a templated question is about; None for any other question."""
    return _FOCUS.get(question)


def focus_mask(patch_classes: np.ndarray, color: str | None, shape: str) -> np.ndarray:
    """The patches an answer about (``color``, ``shape``) must look at: (V, N) bool.

    Patches of objects of that shape (and colour, when given). When the scene has no such object
    (an existence question answered "no"), the near misses: patches of that shape in any colour,
    else of that colour on any shape. ``patch_classes`` (V, N, 3) from ``patch_targets``.
    """
    is_shape = patch_classes[..., 1] == SHAPES.index(shape)
    if color is None:
        return is_shape
    is_color = patch_classes[..., 0] == list(COLORS).index(color)
    for mask in (is_shape & is_color, is_shape, is_color):
        if mask.any():
            return mask
    return is_shape


def _matching(objects: list[dict], color: str | None, shape: str) -> list[dict]:
    return [o for o in objects if o["shape"] == shape and (color is None or o["color"] == color)]


def matches(objects: list[dict], color: str | None, shape: str) -> int:
    """How many scene objects have that shape (and colour, when given)."""
    return len(_matching(objects, color, shape))


TALLY_MARKS = ("centres", "objects")  # which image tokens of the matching objects the tally counts


def match_centres(objects: list[dict], color: str | None, shape: str, height: int, width: int, tile: int) -> np.ndarray:
    """The centre patches (``centre_targets``) of the objects with that shape (and colour, when given):
    (V, N) bool, one patch per matching object in each view that shows its centre, possibly empty."""
    return centre_targets(_matching(objects, color, shape), height, width, tile)


def match_mask(patch_classes: np.ndarray, color: str | None, shape: str) -> np.ndarray:
    """The patches of the objects with that shape (and colour, when given): (V, N) bool, possibly empty."""
    mask = patch_classes[..., 1] == SHAPES.index(shape)
    if color is not None:
        mask = mask & (patch_classes[..., 0] == list(COLORS).index(color))
    return mask


# ----------------------------------------------------------------------------- per-patch targets

PATCH_FIELDS = {"color": tuple(COLORS) + ("none",), "shape": SHAPES + ("none",), "glyph": GLYPHS + ("none",)}
IGNORE = -100
_CORE, _EDGE = 0.7, 1.05  # inside this share of an object's half-size: the object; up to _EDGE: ignored
_GLYPH_SHARE = 0.2  # share of the glyph's ink box a patch must hold to be labelled with the glyph


def _patch_centres(height: int, width: int, tile: int, patch: int) -> np.ndarray:
    """Image-pixel coordinates of every patch centre of every view. Returns (V, N, 2) as (x, y)."""
    sx, sy, px, py, rows, cols = _tile_transform(height, width, tile)
    side = tile // patch
    grid = (np.arange(side) + 0.5) * patch  # (S,)
    gx, gy = np.meshgrid(grid, grid)  # (S, S) each, row-major like the patch sequence
    local = np.stack([gx.ravel(), gy.ravel()], axis=1)  # (N, 2) in tile pixels
    views = [local * np.array([width / tile, height / tile])]  # base view: the whole image squashed
    for r in range(rows):
        for c in range(cols):
            canvas = local + np.array([c * tile, r * tile])
            views.append((canvas - np.array([px, py])) / np.array([sx, sy]))
    return np.stack(views)  # (V, N, 2)


def patch_targets(objects: list[dict], height: int, width: int, tile: int, patch: int = 14) -> np.ndarray:
    """Class index per patch of every view for colour, shape and glyph (``PATCH_FIELDS`` order).

    A patch whose centre lies in an object's core gets its colour and shape, near an object's edge
    it is ignored (-100), elsewhere "none". In each tile, every patch holding at least
    ``_GLYPH_SHARE`` of the glyph's ink box gets the glyph class, patches touching less of it are
    ignored; the base view gets no glyph targets (the glyph is too small to read there).

    Returns:
        (V, N, 3) int64 array, V views (base first), N = (tile // patch) ** 2 patches.
    """
    centres = _patch_centres(height, width, tile, patch)  # (V, N, 2)
    V, N, _ = centres.shape
    out = np.empty((V, N, 3), dtype=np.int64)
    out[..., 0], out[..., 1], out[..., 2] = len(COLORS), len(SHAPES), len(GLYPHS)  # "none"
    out[0, :, 2] = IGNORE
    sx, sy, px, py, rows, cols = _tile_transform(height, width, tile)
    side = tile // patch
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        dist = np.abs(centres - np.array([cx, cy])).max(axis=-1) / half  # (V, N) in half-sizes
        out[..., :2][dist < _EDGE] = IGNORE
        core = dist < _CORE
        out[..., 0][core] = list(COLORS).index(obj["color"])
        out[..., 1][core] = SHAPES.index(obj["shape"])
        if obj.get("glyph"):
            if "glyph_box" not in obj:
                raise ValueError(f"object {obj} has a glyph but no 'glyph_box': regenerate the data with tokendrop data")
            gx0, gy0, gx1, gy1 = obj["glyph_box"]
            box = (gx0 * sx + px, gy0 * sy + py, gx1 * sx + px, gy1 * sy + py)  # canvas pixels
            for r in range(rows):
                for c in range(cols):
                    local = (box[0] - c * tile, box[1] - r * tile, box[2] - c * tile, box[3] - r * tile)
                    mark_glyph(out[1 + r * cols + c, :, 2], local, GLYPHS.index(obj["glyph"]), side, patch)
    return out


def mark_glyph(labels: np.ndarray, box: tuple, glyph: int, side: int, patch: int) -> None:
    """Glyph class ``glyph`` on the patches of one view holding >= ``_GLYPH_SHARE`` of the glyph box
    (view pixels), ignore (-100) on patches holding less of it. labels (side * side,) in place."""
    for i in range(max(0, int(box[1] // patch)), min(side, int(box[3] // patch) + 1)):
        for j in range(max(0, int(box[0] // patch)), min(side, int(box[2] // patch) + 1)):
            share = _overlap(box, (j * patch, i * patch, (j + 1) * patch, (i + 1) * patch))
            if share >= _GLYPH_SHARE:
                labels[i * side + j] = glyph
            elif share > 0:
                labels[i * side + j] = IGNORE


def sheet_targets(objects: list, size: int, patch: int = 14) -> np.ndarray:
    """Glyph class per patch of a ``glyph_sheet`` (one view): (N,) int64, "none" = len(GLYPHS)."""
    side = size // patch
    labels = np.full(side * side, len(GLYPHS), dtype=np.int64)
    for obj in objects:
        mark_glyph(labels, obj.glyph_box, GLYPHS.index(obj.glyph), side, patch)
    return labels


def centre_targets(objects: list[dict], height: int, width: int, tile: int, patch: int = 14) -> np.ndarray:
    """The patch holding each object's centre, in every view: (V, N) bool.

    One patch per object per view that shows its centre (the base view shows every centre, a tile
    the centres inside it), whatever the object's size: the mark a size-independent count needs.
    """
    sx, sy, px, py, rows, cols = _tile_transform(height, width, tile)
    side = tile // patch
    out = np.zeros((1 + rows * cols, side * side), dtype=bool)
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        bx, by = cx * tile / width, cy * tile / height  # base view: the whole image squashed to one tile
        out[0, min(side - 1, int(by // patch)) * side + min(side - 1, int(bx // patch))] = True
        gx, gy = cx * sx + px, cy * sy + py  # grid canvas pixels
        c, r = int(gx // tile), int(gy // tile)
        if 0 <= r < rows and 0 <= c < cols:
            lx, ly = gx - c * tile, gy - r * tile
            out[1 + r * cols + c, int(ly // patch) * side + int(lx // patch)] = True
    return out
