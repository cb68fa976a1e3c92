"""Defaults shared by the commands: the bundled model and sample, or a tiny random stand-in."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

SAMPLE_QUESTION = "What is in the image?"


def load_default_model(name_or_path: str | None):
    """(model, processor, note): the given model, else the bundled one, else a tiny random model."""
    from tokendrop.loading import bundled_model_path, load_model

    if name_or_path:
        return (*load_model(name_or_path), None)
    bundled = bundled_model_path()
    if bundled is not None:
        return (*load_model(str(bundled)), f"model: the bundled trained model ({bundled})")
    from tokendrop.tiny import tiny_llava_next

    model, processor = tiny_llava_next(text_layers=8)
    processor.tokenizer.padding_side = "left"
    return model, processor, "model: a tiny RANDOM-WEIGHT LLaVA-NeXT (no bundled model in this install): answers are noise"


def load_demo_image(path: str | None, question: str | None):
    """(PIL image, question, note): the given image, else the bundled sample, else a generated one."""
    from PIL import Image, UnidentifiedImageError

    if path:
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), question or SAMPLE_QUESTION, None
        except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
            raise FileNotFoundError(f"--image {path!r} cannot be read as an image: {err.__class__.__name__}") from None
    assets = Path(str(resources.files("tokendrop") / "assets"))
    sample = assets / "sample.png"
    if sample.exists():
        meta = json.loads((assets / "sample.json").read_text()) if (assets / "sample.json").exists() else {}
        note = f"image: the bundled sample ({sample.name})"
        if "answer" in meta and not question:
            note += f"; expected answer: {meta['answer']}"
        with Image.open(sample) as img:
            return img.convert("RGB"), question or meta.get("question", SAMPLE_QUESTION), note
    import numpy as np

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    return img, question or SAMPLE_QUESTION, "image: a generated noise image (no bundled sample in this install)"
