"""Load a VQA dataset folder: ``DIR/questions.jsonl`` + images (format: docs/data_format.md).

Every problem is reported with the file and, for JSONL content, the 1-based line number, e.g.
``/data/tvqa/questions.jsonl:17: missing required field 'answers'``. Every image is decoded once
when the folder is read (a truncated or oversized file fails then, not mid-evaluation) and read by
the rule of `tokendrop.data.images` (EXIF orientation applied, 16-bit grey scaled, RGB).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tokendrop.data.images import ImageLoadError, check_image, open_image, progress_bar, to_rgb

QUESTIONS_FILE = "questions.jsonl"
REQUIRED_FIELDS = ("image", "question", "answers")
_KNOWN_FIELDS = {"id", "image", "question", "answers", "answer", "type"}


@dataclass
class Sample:
    """One question about one image.

    Attributes:
        id: unique id (the line number when the file has no ``id``).
        image_path: absolute path of the image (None when the image comes from a dataset row).
        question: the question text.
        answers: annotator answers (at least one).
        answer: canonical answer (the most frequent annotator answer when the file has none).
        type: question type, or None.
        meta: every other field of the JSON object (e.g. ``objects`` and ``grid`` in synthetic data).
        image_loader: reads the image when it is not a file (a Hugging Face `datasets` row), else None.
        image_size: (height, width) of the image as `load_image` gives it, found when the source was
            read (every image is decoded then); None for a Sample made by hand.
    """

    id: str
    image_path: Path | None
    question: str
    answers: list[str]
    answer: str
    type: str | None = None
    meta: dict = field(default_factory=dict)
    image_loader: Callable[[], Image.Image] | None = field(default=None, repr=False, compare=False)
    image_size: tuple[int, int] | None = field(default=None, repr=False, compare=False)

    def load_image(self) -> Image.Image:
        """The image as RGB, by the rule of `tokendrop.data.images` (EXIF orientation, 16-bit scaled)."""
        if self.image_loader is not None:
            return to_rgb(self.image_loader())
        return open_image(self.image_path)


def _where(path: Path, lineno: int) -> str:
    return f"{path}:{lineno}"


def _string_list(value, where: str, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: field '{name}' must be a non-empty list of strings, got {value!r}")
    return value


def parse_record(obj, root: Path, where: str, lineno: int) -> Sample:
    """Validate one decoded JSON object and turn it into a Sample (``where`` prefixes errors)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in obj:
            raise ValueError(f"{where}: missing required field '{name}'")
    if not isinstance(obj["question"], str) or not obj["question"].strip():
        raise ValueError(f"{where}: field 'question' must be a non-empty string")
    if not isinstance(obj["image"], str):
        raise ValueError(f"{where}: field 'image' must be a string path relative to {root}")
    answers = _string_list(obj["answers"], where, "answers")
    answer = obj.get("answer")
    if answer is None:
        answer = Counter(answers).most_common(1)[0][0]
    elif not isinstance(answer, str):
        raise ValueError(f"{where}: field 'answer' must be a string, got {answer!r}")
    image_path = (root / obj["image"]).resolve()
    if Path(obj["image"]).is_absolute() or not image_path.is_relative_to(root.resolve()):
        raise ValueError(f"{where}: field 'image' must be a path inside the dataset folder {root}, got {obj['image']!r}")
    if not image_path.is_file():
        raise FileNotFoundError(f"{where}: image not found: {image_path}")
    qtype = obj.get("type")
    return Sample(
        id=str(obj.get("id", lineno)),
        image_path=image_path,
        question=obj["question"],
        answers=answers,
        answer=answer,
        type=None if qtype is None else str(qtype),
        meta={k: v for k, v in obj.items() if k not in _KNOWN_FIELDS},
    )


def load_dataset(root: str | Path, limit: int | None = None, progress: bool | None = None) -> list[Sample]:
    """Read ``root/questions.jsonl`` (one JSON object per line; blank lines are skipped) and decode
    every image it names once (images are not kept: a sample reads its image when asked).

    Args:
        root: dataset folder holding ``questions.jsonl``; image paths are relative to it.
        limit: keep only the first ``limit`` samples (None: all).
        progress: a progress bar while the images are checked (None: on a terminal only).

    Raises:
        FileNotFoundError: missing folder, missing ``questions.jsonl`` or missing image.
        ValueError: malformed JSON, missing or ill-typed field, duplicate id, an image that cannot be
            decoded (truncated, not an image, over Pillow's pixel limit) (file and line named).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    path = root / QUESTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a dataset folder holds {QUESTIONS_FILE} and its images)")
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = _where(path, lineno)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            sample = parse_record(obj, root, where, lineno)
            if sample.id in seen:
                raise ValueError(f"{where}: duplicate id {sample.id!r} (first on line {seen[sample.id]})")
            seen[sample.id] = lineno
            samples.append(sample)
            if limit is not None and len(samples) >= limit:
                break
    if not samples:
        raise ValueError(f"{path}: no samples")
    _check_images(samples, seen, path, progress)
    return samples


def _check_images(samples: list[Sample], lines: dict[str, int], path: Path, progress: bool | None) -> None:
    """Decode each distinct image once and note its size in the samples; ValueError naming the first
    line whose image cannot be read."""
    first, sizes = {}, {}  # image path -> the first sample naming it, its (height, width)
    for sample in samples:
        first.setdefault(sample.image_path, sample)
    for image_path, sample in progress_bar(first.items(), progress):
        try:
            sizes[image_path] = check_image(image_path)
        except ImageLoadError as err:
            where = _where(path, lines[sample.id])
            raise ValueError(f"{where}: image {image_path} cannot be read ({err.reason})") from None
    for sample in samples:
        sample.image_size = sizes[sample.image_path]
