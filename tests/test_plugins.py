"""Third-party methods (the `tokendrop.methods` entry-point group) that cannot be built: one warning each,
an error naming the plugin when asked for by name, and every other method and command unharmed (#25 row 11)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import pytest

import tokendrop as td
from tokendrop import registry

PLUGINS = textwrap.dedent('''
    from dataclasses import dataclass

    from tokendrop.methods.fastv import FastV
    from tokendrop.methods.spatial_drop import SpatialDrop

    @dataclass(frozen=True, kw_only=True)
    class NeedsKeep(SpatialDrop):
        """A plugin with a required option besides the budget."""
        keep: int
        name = "needs-keep"

    @dataclass(frozen=True)
    class Raises(FastV):
        """A plugin whose defaults its own check refuses."""
        name = "raises"

        def __post_init__(self):
            raise ValueError("k must be chosen by the user")

    @dataclass(frozen=True)
    class Fine(SpatialDrop):
        """A plugin that works."""
        name = "fine"
''')
ENTRIES = {"needs-keep": "td_plugins_25:NeedsKeep", "raises": "td_plugins_25:Raises", "fine": "td_plugins_25:Fine"}


@pytest.fixture
def plugins(tmp_path, monkeypatch, registry_restored):
    """The three plugins installed (entry points as importlib.metadata lists them), the registry reloaded."""
    (tmp_path / "td_plugins_25.py").write_text(PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    ours = metadata.EntryPoints(metadata.EntryPoint(name, value, registry.ENTRY_POINTS) for name, value in ENTRIES.items())
    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points", lambda **kw: ours if kw.get("group") == registry.ENTRY_POINTS else real(**kw))
    monkeypatch.setattr(registry, "_broken", {}, raising=False)
    registry._methods.clear()
    return tmp_path


def load_quietly() -> None:
    """Load the plugins, their warnings aside (the first test checks them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        registry.method_names()


def test_a_plugin_that_cannot_be_built_is_one_warning_naming_it(plugins):
    with pytest.warns(UserWarning) as caught:
        names = registry.method_names()
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2, messages
    assert messages[0].startswith("method plugin 'needs-keep' (td_plugins_25:NeedsKeep) not loaded: ") and "'keep'" in messages[0]
    assert messages[1].startswith("method plugin 'raises' (td_plugins_25:Raises) not loaded: ")
    assert "k must be chosen by the user" in messages[1]
    assert "fine" in names and "hired" in names and not {"needs-keep", "raises"} & set(names)


def test_the_other_methods_and_commands_keep_working(plugins, capsys):
    from tokendrop.cli import build_parser, main
    from tokendrop.cli.options import method_configs

    load_quietly()
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "fine: Fine, before the LLM" in out and "hired: HiRED" in out and "fastv: FastV" in out
    assert "needs-keep" not in out and "raises" not in out
    assert main(["methods", "--json"]) == 0
    args = build_parser().parse_args(["run", "--method", "fine,hired", "--budget", "0.3"])
    assert method_configs(args) == (["fine", "hired"], [0.3], {})


def test_asking_for_a_broken_plugin_names_it_and_why(plugins, capsys):
    from tokendrop.cli import main

    load_quietly()
    with pytest.raises(ValueError, match=r"method plugin 'raises' \(td_plugins_25:Raises\) not loaded: .*k must be chosen"):
        registry.method_class("raises")
    with pytest.raises(ValueError, match=r"method plugin 'needs-keep' .* not loaded: .*'keep'"):
        registry.build_methods("needs-keep", budget=0.2, keep=3)
    assert main(["run", "--method", "needs-keep", "--budget", "0.2"]) == 2  # before any model is loaded
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokendrop run: error: --method: method plugin 'needs-keep'") and len(err.splitlines()) == 1


def test_register_method_refuses_a_class_that_cannot_be_built_from_its_defaults(plugins):
    load_quietly()
    import td_plugins_25 as p  # the module the entry points loaded

    with pytest.raises(TypeError, match="NeedsKeep: option 'keep' has no default; every option but budget needs one"):
        td.register_method(p.NeedsKeep)
    with pytest.raises(TypeError, match="Raises cannot be built from its defaults: ValueError: k must be chosen by the user"):
        td.register_method(p.Raises)
    assert td.register_method(p.Fine) is p.Fine and registry.runs_on(p.Fine) == registry.runs_on(td.SpatialDrop)


def test_the_command_line_prints_one_warning_line_per_broken_plugin(tmp_path):
    # The real thing: a package installed beside tokendrop (a dist-info folder on the path), `tokendrop methods`.
    (tmp_path / "td_plugins_25.py").write_text(PLUGINS)
    dist = tmp_path / "td_plugins_25-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: td-plugins-25\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tokendrop.methods]\n" + "".join(f"{n} = {v}\n" for n, v in ENTRIES.items()))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    cli = Path(sys.executable).parent / "tokendrop"
    run = subprocess.run([str(cli), "methods"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "fine: Fine" in run.stdout and "hired: HiRED" in run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2 and all("UserWarning: method plugin '" in line for line in lines), run.stderr
    assert "'needs-keep'" in lines[0] + lines[1] and "'raises'" in lines[0] + lines[1]
