"""Evaluation results on disk: JSON lines, one record per configuration, appended as each finishes.

A killed run keeps every configuration it finished. Resuming reads them back:

- a last line the kill cut short is an unfinished write: it holds no record, `repair()` drops it (the
  file is cut back to its last complete line, so it stays valid JSON lines and every finished record
  stays byte for byte); its configuration runs again;
- the records must come from a run with the same settings (`differences()`), else the file would mix
  two runs; the method and budget label a configuration, so a grid may grow by methods and budgets,
  and a method's options only matter to the records of that method;
- the configurations the file holds are skipped, so only the missing ones run.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

OPTIONS = "method_args"  # the run setting holding the grid's method options, compared per method


def holds_results(path: Path) -> bool:
    """Whether `path` is a regular file with content (a device, a pipe or an empty file holds none)."""
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


class ResultsFile:
    """An append-only JSON-lines file of evaluation records.

    Args:
        path: the file.
        run: the settings that make records comparable (model, data, metrics, ...); stored in every
            record under "run" and compared on resume. `run["method_args"]`, when given, holds the
            method options of the whole grid: a record is compared on those that apply to its method.
        resume: read the records already in `path`; otherwise `path` must not hold any (finished
            work is never overwritten). Only a regular file with content holds records: an empty
            file, a character device (/dev/stdout) or a pipe is appended to as it is.

    Attributes:
        records: the records in the file (finished ones only).
        unfinished: the text of a last line cut short by a killed write (dropped by `repair()`), or None.
    """

    def __init__(self, path: str | Path, run: dict, resume: bool = False):
        self.path, self.run = Path(path), json.loads(json.dumps(run))  # JSON-normalised for comparing
        self.records: list[dict] = []
        self.unfinished: str | None = None
        self._keep: int | None = None  # bytes to keep when the file does not end with a complete line
        self._newline = False  # the last record is complete but its line is not ended
        if holds_results(self.path) and not resume:
            raise FileExistsError(f"{self.path} already holds results: pass --resume to continue it, or choose another path")
        if resume and holds_results(self.path):
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # every record add() finished ends with its newline
        self.records = _parse(data[:end].decode("utf-8", errors="replace"), self.path)
        tail = data[end:]
        if not tail.strip():
            self._keep = end if tail else None
            return
        try:
            json.loads(tail)
        except ValueError:  # the write a killed process did not finish (a prefix of a record never parses)
            self.unfinished, self._keep = tail.decode("utf-8", errors="replace"), end
            return
        # a finished record whose newline is missing (e.g. an editor dropped it): kept
        self.records += _parse(tail.decode("utf-8"), self.path, first=data[:end].count(b"\n") + 1)
        self._newline = True

    def differences(self, methods: list[str]) -> list[tuple[str, object, object]]:
        """How the file's records differ from this run's settings: (setting, old, new), each setting once.

        Run-wide settings count in every record; method options only for the records of a method in
        `methods` (the grid about to run), as the setting "method_args <method>" with the options that
        apply to it (old and new dicts).
        """
        found: dict[str, tuple] = {}
        for record in self.records:
            for setting, change in self._changes(record, options=record.get("method") in methods).items():
                found.setdefault(setting, change)
        return [(setting, old, new) for setting, (old, new) in found.items()]

    def done(self, label: str) -> dict | None:
        """The record of configuration `label` from an earlier run with the same settings, if any."""
        return next((r for r in self.records if r.get("label") == label and not self._changes(r, options=True)), None)

    def repair(self) -> None:
        """End the file with a complete line: drop an unfinished last line (`unfinished`), or end the line
        of a finished last record. Finished records are not touched. `add()` does it first."""
        if self._keep is not None:
            _truncate(self.path, self._keep)
            self._keep = None
        if self._newline:
            _append(self.path, b"\n")
            self._newline = False

    def add(self, record: dict) -> None:
        """Append one record and flush it to disk.

        Raises:
            OSError: the write failed (e.g. a full disk); its `filename` is this file, and the file is
                cut back to the records before this one.
        """
        record = dict(record, run=self.run)
        self.repair()
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            _append(self.path, (json.dumps(record) + "\n").encode("utf-8"))
        except OSError as err:
            try:
                if self.path.is_file():  # no half line left behind; a later resume would drop it anyway
                    _truncate(self.path, size)
            except OSError:
                pass
            err.filename = str(self.path)
            raise
        self.records.append(record)

    def _changes(self, record: dict, options: bool) -> dict[str, tuple]:
        """{setting: (old, new)} for the settings in which `record` differs from this run; with `options`,
        also the method options that apply to its method."""
        old = record.get("run") or {}
        changes = {key: (old.get(key), self.run.get(key)) for key in [*self.run, *(k for k in old if k not in self.run)]
                   if key != OPTIONS and not _same(key, old.get(key), self.run.get(key))}
        method = record.get("method")
        if options and _options(old, method) != _options(self.run, method):
            changes[f"{OPTIONS} {method}"] = (_options(old, method), _options(self.run, method))
        return changes


def _options(run: dict, method: str | None) -> dict:
    """The method options of `run` that apply to `method` (a grid's options apply per method)."""
    from tokendrop.registry import option_owners

    options = run.get(OPTIONS) or {}
    return {key: value for key, value in options.items() if method is not None and option_owners(method, key)}


def _same(key: str, old, new) -> bool:
    if key == "metrics" and isinstance(old, list) and isinstance(new, list):
        return sorted(old) == sorted(new)  # every record holds every metric; the order only picks the table's
    return old == new


def _record(line: str) -> dict:
    record = json.loads(line)
    if not isinstance(record, dict) or "label" not in record:
        raise ValueError("not a record of tokendrop eval (a JSON object with a label)")
    return record


def _parse(text: str, path: Path, first: int = 1) -> list[dict]:
    """The records of `text`, lines `first`, `first` + 1, ... of `path`; ValueError naming a line that is not one."""
    records = []
    for i, line in enumerate(text.splitlines(), start=first):
        if not line.strip():
            continue
        try:
            records.append(_record(line))
        except ValueError:  # json.JSONDecodeError is one
            raise ValueError(f"{path}:{i}: not a JSON record; is this a results file of tokendrop eval? "
                             "(delete or fix that line to resume)") from None
    return records


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # a device or pipe cannot be synced (EINVAL)
            os.fsync(f.fileno())


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())
