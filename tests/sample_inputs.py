"""Inputs several test modules build (a plain module: test files import it by this unique name, never
`conftest`, which names a different file in each test folder)."""

from __future__ import annotations

import numpy as np
from PIL import Image

#: three images whose anyres grids differ: 2x2, 1x2 (wide), 3x1 (tall)
SIZES = [(224, 224), (150, 300), (330, 100)]
PROMPTS = ["<image>\nQ: what is it? A:", "<image>\nQ: what colour is the big one? A:", "<image>\nQ: how many? A:"]


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def with_tiny_options(methods: tuple) -> tuple:
    """`methods` with the options their class names for the tiny random models (`Method.tiny_options`:
    CDPruner's tiny random CLIP), so that every registered method runs without a download."""
    import dataclasses

    return tuple(dataclasses.replace(m, **type(m).tiny_options()) if type(m).tiny_options() else m for m in methods)
