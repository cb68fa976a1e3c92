"""One entry point for every data source `tokendrop eval --data` accepts.

    load_samples("data/heldout")                                  # a tokendrop folder (docs/data_format.md)
    load_samples("textvqa_val.parquet", columns={"id": "question_id"})   # Hugging Face `datasets`
"""

from __future__ import annotations

from pathlib import Path

from tokendrop.data.dataset import Sample, load_dataset


def load_samples(spec: str | Path, columns: dict[str, str] | None = None, split: str | None = None,
                 limit: int | None = None, progress: bool | None = None) -> list[Sample]:
    """Samples from a tokendrop dataset folder, or from a `datasets` source (`tokendrop.data.hf`).
    Every sample's image is decoded once before this returns (`progress`: a bar meanwhile; None: on
    a terminal only); none is kept in memory.

    Raises:
        FileNotFoundError: nothing of that name (the message names what was looked for).
        ValueError: a malformed source, an image that cannot be read (file and line, or row and column,
            named); `columns` or `split` given for a tokendrop folder.
        ImportError: a `datasets` source without the `datasets` package (the message says how to install it).
    """
    from tokendrop.data.hf import INSTALL, is_hf_source, load_hf_samples

    if not is_hf_source(spec):
        if columns or split:
            raise ValueError(f"{spec} is a tokendrop dataset folder: column mappings and splits are for "
                             "Hugging Face `datasets` sources")
        return load_dataset(spec, limit=limit, progress=progress)
    if not Path(spec).exists():  # a hub id, or a mistyped path
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise FileNotFoundError(f"{spec}: no such folder or file (reading a Hugging Face hub id from the "
                                    f"local cache needs `datasets`: {INSTALL})") from None
    return load_hf_samples(spec, columns, split, limit, progress)
