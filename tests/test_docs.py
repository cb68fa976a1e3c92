"""The documentation's code runs as written: every Python block of docs/extending.md, in order."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from tokendrop import registry

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_extending_md_runs_against_the_bundled_model(registry_restored, capsys):
    from tokendrop.loading import bundled_model_path

    if bundled_model_path() is None:
        pytest.skip("the bundled model is not installed")
    blocks = python_blocks(DOCS / "extending.md")
    assert len(blocks) >= 4
    module = types.ModuleType("extending_md")  # the blocks' classes live in a module, as a user's would
    sys.modules[module.__name__] = module
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/extending.md block {i + 1}", "exec", dont_inherit=True), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    assert {"centre", "keep-n"} <= set(registry.method_names())
    assert "vipllava" in [family.name for family in registry.families()], "the page's family is registered"
    assert capsys.readouterr().out.strip(), "the examples print what they did"
