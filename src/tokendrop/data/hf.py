"""VQA samples from a Hugging Face `datasets` dataset (needs `pip install "tokendrop[datasets]"`).

    samples = load_hf_samples("textvqa_val.parquet", columns={"id": "question_id"})
    samples = load_hf_samples("saved/docvqa", columns={"id": "questionId"}, split="validation")
    samples = load_hf_samples("lmms-lab/ChartQA", columns={"answers": "answer"})   # from the local cache

A source is a `save_to_disk` folder, a .parquet / .json / .jsonl / .csv file, a folder of such files,
or a hub id already in the local Hugging Face cache (set HF_DATASETS_OFFLINE=1 to make sure nothing is
downloaded). Columns map to `Sample` fields by `columns` (field -> column); a field's default column
has the field's own name. Every row's image is decoded once when the dataset is read (a missing, null,
corrupt, truncated or oversized image is reported with its row and column before any model work) and
again when its sample is answered; images are not kept in memory. They are read by the rule of
`tokendrop.data.images`, also for `datasets.Image` columns (read undecoded, then opened by that rule).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from PIL import Image

from tokendrop.data.dataset import Sample
from tokendrop.data.images import ImageLoadError, open_image, progress_bar, to_rgb

#: Sample fields a column can fill; the first three are required.
FIELDS = ("image", "question", "answers", "id", "type", "answer")
REQUIRED = ("image", "question", "answers")
#: file suffix -> the `datasets` builder that reads it
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
INSTALL = 'pip install "tokendrop[datasets]"'


def parse_columns(text: str | None) -> dict[str, str]:
    """'image=img,answers=answer' -> {"image": "img", "answers": "answer"}; unknown fields raise ValueError."""
    columns = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"columns are field=column pairs separated by commas, got {item.strip()!r}")
        if key not in FIELDS:
            raise ValueError(f"unknown field {key!r}; fields: {', '.join(FIELDS)}")
        columns[key] = value
    return columns


def is_hf_source(spec: str | Path) -> bool:
    """Whether `spec` names something `load_hf_samples` reads (and not a tokendrop dataset folder)."""
    path = Path(spec)
    if path.is_dir():
        return not (path / "questions.jsonl").is_file()
    return path.suffix.lower() in FILE_BUILDERS or (not path.exists() and bool(_HUB_ID.match(str(spec))))


def open_dataset(spec: str | Path, split: str | None = None):
    """The `datasets.Dataset` that `spec` names (one split of it).

    Raises:
        ImportError: `datasets` is not installed (the message says how to install it).
        FileNotFoundError: no such file or folder, or a hub id that is not in the local cache.
        ValueError: several splits and no `split`, or an unknown `split`.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {spec} needs the Hugging Face `datasets` package: {INSTALL}") from None
    path = Path(spec)
    # 1. a save_to_disk folder, a data file, a folder of data files, or a hub id in the cache
    if path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json")):
        data = datasets.load_from_disk(str(path))
    elif path.is_file():
        if path.suffix.lower() not in FILE_BUILDERS:
            raise ValueError(f"{path}: a data file is one of {', '.join(FILE_BUILDERS)}")
        data = datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path))
    elif path.is_dir() or _HUB_ID.match(str(spec)):
        try:
            data = datasets.load_dataset(str(spec))
        except (FileNotFoundError, ConnectionError) as err:
            raise FileNotFoundError(f"{spec}: no such folder or file, nor a dataset in the local Hugging Face cache "
                                    f"({type(err).__name__}: {err})") from None
    else:
        raise FileNotFoundError(f"{spec}: no such file or folder")
    # 2. one split
    if isinstance(data, datasets.Dataset):
        if split is not None and data.split is not None and str(data.split) != split:
            raise ValueError(f"{spec} holds only the split {data.split!r}, not {split!r}")
        return data
    if split is None:
        if len(data) != 1:
            raise ValueError(f"{spec} has splits {', '.join(data)}: choose one (--split)")
        split = next(iter(data))
    if split not in data:
        raise ValueError(f"{spec} has no split {split!r}; splits: {', '.join(data)}")
    return data[split]


def load_hf_samples(spec: str | Path, columns: dict[str, str] | None = None, split: str | None = None,
                    limit: int | None = None, progress: bool | None = None) -> list[Sample]:
    """Samples from a `datasets` source (see the module docstring), in the dataset's row order.

    Args:
        columns: field -> column, e.g. {"id": "question_id", "answers": "answer"}; unnamed fields
            read the column of their own name (optional fields only when it exists).
        split: the split to read when the source has several.
        limit: the first `limit` rows only.
        progress: a progress bar while the images are checked (None: on a terminal only).

    Raises:
        ValueError: a missing column, an empty or ill-typed value, a duplicate id, or an image that
            cannot be read (source, row and column named).
    """
    data = open_dataset(spec, split)
    mapping = _mapping(data.column_names, columns or {}, spec)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    if len(data) == 0:
        raise ValueError(f"{spec}: no rows")
    root = Path(spec).parent if Path(spec).is_file() else Path(spec)  # where relative image paths start
    text = data.select_columns([c for f, c in mapping.items() if f != "image"])[:]  # column -> values, no image decoded
    images = _undecoded(data.select_columns([mapping["image"]]), mapping["image"])
    samples = [_sample(text, mapping, i, images, root, spec) for i in range(len(data))]
    _check_unique(samples, spec)
    for sample, size in zip(samples, _check_images(images, mapping["image"], root, spec, progress)):
        sample.image_size = size
    return samples


def _undecoded(data, column: str):
    """`data` with a `datasets.Image` column read as {"bytes", "path"} (opened by tokendrop's rule)."""
    import datasets

    feature = data.features[column]
    if isinstance(feature, datasets.Image) and feature.decode:
        data = data.cast_column(column, datasets.Image(decode=False))
    return data


def _check_images(images, column: str, root: Path, spec, progress: bool | None) -> list[tuple[int, int]]:
    """Decode every row's image once (none kept): their (height, width); ValueError naming the first
    bad row (and the next bad ones)."""
    bad, sizes = [], []  # (row, error); (height, width) per row
    for row, record in enumerate(progress_bar(images, progress, total=len(images))):
        try:
            with to_image(record[column], root) as image:
                sizes.append((image.height, image.width))
        except ImageLoadError as err:
            bad.append((row, err))
    if bad:
        row, err = bad[0]
        others = ", ".join(str(r) for r, _ in bad[1:11]) + (", ..." if len(bad) > 11 else "")
        more = f" (also unreadable: row{'s' if len(bad) > 2 else ''} {others})" if others else ""
        raise ValueError(f"{spec}: row {row}: column {column!r}: {err}{more}")
    return sizes


def _mapping(names: list[str], columns: dict[str, str], spec) -> dict[str, str]:
    """field -> column for every field the dataset fills."""
    mapping = {}
    for field in FIELDS:
        column = columns.get(field, field)
        if column in names:
            mapping[field] = column
        elif field in REQUIRED or field in columns:
            how = "" if field in columns else f" (map another with --columns {field}=COLUMN)"
            raise ValueError(f"{spec}: no column {column!r} for field {field!r}{how}; columns: {', '.join(names)}")
    return mapping


def _sample(text: dict, mapping: dict[str, str], i: int, images, root: Path, spec) -> Sample:
    where = f"{spec}: row {i}"
    value = {field: text[column][i] for field, column in mapping.items() if field != "image"}
    question = value["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: column {mapping['question']!r} must hold a non-empty string, got {question!r}")
    answers = _answers(value["answers"], where, mapping["answers"])
    answer = value.get("answer")
    if not isinstance(answer, str):
        answer = Counter(answers).most_common(1)[0][0]
    qtype = value.get("type")
    column = mapping["image"]
    return Sample(id=str(value.get("id", i)), image_path=None, question=question, answers=answers, answer=answer,
                  type=None if qtype is None else str(qtype),
                  image_loader=lambda: to_image(images[i][column], root))


def _answers(value, where: str, column: str) -> list[str]:
    """A string, a list of strings, or VQAv2's list of {"answer": ...} records -> a list of strings."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        value = [v["answer"] if isinstance(v, dict) and "answer" in v else v for v in value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: column {column!r} must hold a string or a non-empty list of strings, got {value!r}")
    return value


def _check_unique(samples: list[Sample], spec) -> None:
    first = {}
    for row, sample in enumerate(samples):
        if sample.id in first:
            raise ValueError(f"{spec}: row {row}: duplicate id {sample.id!r} (first in row {first[sample.id]})")
        first[sample.id] = row


def to_image(value, root: Path) -> Image.Image:
    """The RGB image (`tokendrop.data.images` rule) in what an image column holds: an image,
    {"bytes", "path"}, bytes, or a file path (relative to `root`).

    Raises:
        ImageLoadError: no image (null), or one that cannot be read.
    """
    if isinstance(value, Image.Image):
        return to_rgb(value)
    name = None
    if isinstance(value, dict):
        name = value.get("path") if isinstance(value.get("path"), str) else None  # the file the bytes came from
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise ImageLoadError("null", "the row holds no image")
    if isinstance(value, (bytes, bytearray)):
        return open_image(value, name)
    if isinstance(value, str):
        return open_image(root / value)  # an absolute path stays itself
    raise ImageLoadError(repr(value)[:60], f"expected an image, image bytes or a path, got {type(value).__name__}")
