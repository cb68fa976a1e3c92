"""Evaluation results on disk: JSON lines, one record per configuration, appended as each finishes.

A killed run keeps every configuration it finished; `--resume` reads them back and skips those
configurations (same label, same run settings), so only the missing ones run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class ResultsFile:
    """An append-only JSON-lines file of evaluation records.

    Args:
        path: the file.
        run: the settings that make records comparable (model, data, metrics, options, ...);
            stored in every record under "run" and compared on resume.
        resume: read the records already in `path`; otherwise `path` must not exist (finished
            work is never overwritten).
    """

    def __init__(self, path: str | Path, run: dict, resume: bool = False):
        self.path, self.run = Path(path), json.loads(json.dumps(run))  # JSON-normalised for comparing
        self.records: list[dict] = []
        if self.path.exists() and not resume:
            raise FileExistsError(f"{self.path} already holds results: pass --resume to continue it, or choose another path")
        if resume and self.path.exists():
            self.records = read_records(self.path)

    def done(self, label: str) -> dict | None:
        """The record of configuration `label` from an earlier run with the same settings, if any."""
        return next((r for r in self.records if r.get("label") == label and r.get("run") == self.run), None)

    def add(self, record: dict) -> None:
        """Append one record and flush it to disk."""
        record = dict(record, run=self.run)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)


def read_records(path: str | Path) -> list[dict]:
    """Records of a results file; a last line cut short by a killed process is skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):  # the write the process did not finish
                break
            raise ValueError(f"{path}:{i}: not a JSON record; is this a results file of tokendrop eval?") from None
    return records
