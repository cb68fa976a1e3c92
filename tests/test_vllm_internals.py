"""The vLLM internals table (`tokendrop.vllm.internals`) without vLLM: it lists every vLLM name the
plugin imports, and its check names an entry that moved or whose signature changed."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

from tokendrop.vllm import VLLM_REQUIREMENT
from tokendrop.vllm.internals import VLLM_INTERNALS, Internal, SourceTree, check, check_all

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tokendrop"
PLUGIN = [*sorted((SRC / "vllm").glob("*.py")), *sorted(SRC.glob("families/*/vllm.py"))]


def vllm_imports(path: Path) -> set[tuple[str, str]]:
    """(module, name) of every `from vllm... import name` in a file."""
    tree = ast.parse(path.read_text())
    return {(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm"
            for alias in node.names}


@pytest.mark.parametrize("path", PLUGIN, ids=lambda p: str(p.relative_to(SRC)))
def test_every_vllm_import_of_the_plugin_is_in_the_table(path):
    listed = {(entry.module, entry.name) for entry in VLLM_INTERNALS}
    assert vllm_imports(path) - listed == set()


def test_the_scan_sees_the_plugin_imports():
    found = set().union(*(vllm_imports(path) for path in PLUGIN))
    assert ("vllm.model_executor.models.llava_next", "LlavaNextForConditionalGeneration") in found
    assert ("vllm", "ModelRegistry") in found


#: a stand-in release: a re-export, a base class, a method, an instance attribute, a field, a behaviour
RELEASE = {
    "vllm/__init__.py": 'MODULE_ATTRS = {"Registry": ".models:Registry"}\n',
    "vllm/models/__init__.py": "from .base import Base as Registry\n",
    "vllm/models/base.py": """
        class Base:
            size: int

            def __init__(self, *, config, prefix=""):
                self.tower = config.tower

            def count(self, *, width, height):
                return width * height

            def run(self, x, **kwargs):
                return call(x, seqlens=kwargs)
        """,
    "vllm/models/model.py": """
        from .base import Base


        class Model(Base):
            pass
        """,
}
ENTRIES = [Internal("vllm", "Registry", "re-exported lazily"),
           Internal("vllm.models.model", "Model.count", "overridden", ("*", "width", "height")),
           Internal("vllm.models.model", "Model.__init__", "called", keywords=("config",)),
           Internal("vllm.models.model", "Model.tower", "read", instance=True),
           Internal("vllm.models.model", "Model.size", "a field"),
           Internal("vllm.models.base", "Base.run", "a behaviour", contains="seqlens=")]


def write_release(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_a_release_with_every_entry_passes(tmp_path):
    assert check_all(SourceTree(write_release(tmp_path, RELEASE)), ENTRIES) == []


@pytest.mark.parametrize("change, entry, says", [
    (("class Base:", "class Base2:"), "Model.count", "no count"),  # the base moved away: its members too
    (("def count(self, *, width, height)", "def count(self, *, width, height, scale)"), "Model.count", "parameters"),
    (("def __init__(self, *, config,", "def __init__(self, *, cfg,"), "Model.__init__", "takes no ['config']"),
    (("self.tower = ", "self.vision = "), "Model.tower", "no instance attribute tower"),
    (("size: int", "width: int"), "Model.size", "no size"),
    (("seqlens=kwargs", "kwargs"), "Base.run", "no longer contains"),
])
def test_a_changed_release_fails_naming_the_entry(tmp_path, change, entry, says):
    old, new = change
    files = {name: text.replace(old, new) if name.startswith("vllm/models/base") else text
             for name, text in RELEASE.items()}
    problems = check_all(SourceTree(write_release(tmp_path, files)), ENTRIES)
    assert len(problems) >= 1 and any(f":{entry}: " in p and says in p for p in problems), problems


def test_a_missing_reexport_fails(tmp_path):
    release = SourceTree(write_release(tmp_path, {**RELEASE, "vllm/__init__.py": "\n"}))
    assert "vllm:Registry: Registry is not in vllm" == check(ENTRIES[0], release)


def test_the_declared_vllm_range_is_the_plugin_s():
    """pyproject's `vllm` extra allows the releases whose internals match (tokendrop.vllm.VLLM_REQUIREMENT)."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    assert extra == [VLLM_REQUIREMENT]
