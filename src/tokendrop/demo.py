"""The image side of the commands' defaults: the bundled sample image and question, or a generated scene.

(The model side is `tokendrop.loading.load_default`.)
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

SAMPLE_QUESTION = "What is in the image?"


from tokendrop.data.images import ImageLoadError, open_image  # noqa: E402,F401  (one image rule for every source)


def load_demo_image(path: str | None, question: str | None):
    """(RGB image, question, note): `path` (ImageLoadError if unreadable), else the bundled sample
    with its question, else a generated scene."""
    if path:
        return open_image(path), question or SAMPLE_QUESTION, None
    assets = Path(str(resources.files("tokendrop") / "assets"))
    sample = assets / "sample.png"
    if sample.exists():
        meta = json.loads((assets / "sample.json").read_text()) if (assets / "sample.json").exists() else {}
        note = f"image: the bundled sample ({sample.name})"
        if "answer" in meta and not question:
            note += f"; expected answer: {meta['answer']}"
        return open_image(sample), question or meta.get("question", SAMPLE_QUESTION), note
    from tokendrop.data.synth import make_sample

    image, record = make_sample(0, 1)  # a 2x2-tile scene
    note = f"image: a generated {image.width}x{image.height} scene (no bundled sample in this install)"
    return image.convert("RGB"), question or record["question"], note
