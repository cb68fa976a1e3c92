"""The registries: option strings, compositions, third-party methods (entry points and register_method)."""

from __future__ import annotations

import re
import textwrap

import pytest

import tokendrop as td
from tokendrop import registry


def test_parse_options_lmms_eval_style():
    assert registry.parse_options("alpha=0.5, variant=official,layers=[8,16,24],fastv.seed=1") == {
        "alpha": "0.5", "variant": "official", "layers": "[8,16,24]", "fastv.seed": "1"}
    assert registry.parse_options(None) == {} == registry.parse_options("")
    for bad in ("alpha", "=3", "layers=[8,16"):
        with pytest.raises(ValueError):
            registry.parse_options(bad)


def test_options_are_converted_by_the_fields_types():
    methods = registry.build_methods("hired+pdrop", budget=0.4, **registry.parse_options(
        "alpha=0.6,final_layer=none,keep_newlines=true,layers=[2,4],ratio=0.25"))
    assert methods == (td.HiRED(0.4, alpha=0.6, final_layer=None, keep_newlines=True),
                       td.PyramidDrop(layers=(2, 4), ratio=0.25))
    assert registry.build_methods("random+fastv", budget=0.2, **{"fastv.seed": "3"}) == (
        td.RandomDrop(0.2), td.FastV(seed=3))
    assert registry.build_methods("hired-official", budget=0.2, alpha="0.3")[0] == td.HiRED(0.2, alpha=0.3, variant="official")
    with pytest.raises(ValueError, match="option k='two' is not a valid int"):
        registry.build_methods("fastv", k="two")
    with pytest.raises(ValueError, match="'alpha' is not an option of pdrop; options: pdrop: layers, ratio"):
        registry.build_methods("pdrop", strict=True, alpha=0.5)


def test_configurations_expand_budgets_only_for_methods_that_take_one():
    assert registry.configurations(["none", "hired", "base-only+fastv", "hired"], [0.1, 0.2]) == [
        ("none", None), ("hired", 0.1), ("hired", 0.2), ("base-only+fastv", None)]


def test_register_method_checks_the_class(registry_restored):
    with pytest.raises(TypeError, match="dataclass subclassing"):
        td.register_method(object)
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Clash(td.SpatialDrop):
        name = "hired"

    with pytest.raises(ValueError, match="method name 'hired' is taken by tokendrop.methods.hired.HiRED"):
        td.register_method(Clash)

    @dataclass(frozen=True)
    class Bad(td.SpatialDrop):
        name = "a+b"

    with pytest.raises(ValueError, match="lowercase name without"):
        td.register_method(Bad)


def test_register_method_refuses_a_name_that_is_not_a_string(registry_restored):
    # #25 row 17: a class whose `name` is not a str was an AttributeError ('int' object has no attribute 'strip').
    from dataclasses import dataclass

    for name, kind in ((3, "int"), (None, "NoneType"), (("a",), "tuple")):
        cls = dataclass(frozen=True)(type("Numbered", (td.SpatialDrop,), {"name": name}))
        with pytest.raises(TypeError, match=re.escape(f"Numbered.name must be a str, got {kind} {name!r}")):
            td.register_method(cls)


def test_a_method_from_an_entry_point_is_known_everywhere(tmp_path, monkeypatch, registry_restored, capsys):
    # A package installed beside tokendrop declares [project.entry-points."tokendrop.methods"].
    (tmp_path / "my_methods.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from tokendrop.methods.spatial_drop import SpatialDrop

        @dataclass(frozen=True)
        class EveryOther(SpatialDrop):
            """Spatial control under another name (a plugin's method)."""
            name = "every-other"
    '''))
    dist = tmp_path / "my_methods-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-methods\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tokendrop.methods]\nevery-other = my_methods:EveryOther\nbroken = my_methods:Nope\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_broken", {})
    registry._methods.clear()
    with pytest.warns(UserWarning, match="method plugin 'broken'"):
        assert "every-other" in registry.method_names()
    assert registry.method_class("every-other").__name__ == "EveryOther"
    from tokendrop.cli import main

    assert main(["methods"]) == 0
    assert "every-other: EveryOther, before the LLM" in capsys.readouterr().out


def test_families_are_found_by_class_and_model_type():
    assert registry.family_of(model_type="llava_next").name == "llava-next"
    assert registry.family_of(architecture="LlavaForConditionalGeneration").name == "llava"
    with pytest.raises(ValueError, match="supported: LlavaNextForConditionalGeneration"):
        registry.family_of(architecture="GPT2LMHeadModel")
    assert registry.runs_on(td.HiRED) == ["llava-next", "llava", "internvl"]  # the towers with a [CLS] token
    assert "llava-onevision" in registry.runs_on(td.PyramidDrop)


# ---- families: the table, third-party families -------------------------------------------------------
def test_the_family_table_is_lazy_and_complete():
    import subprocess
    import sys

    from tokendrop.families import FAMILIES, families

    assert [f.name for f in families()] == list(FAMILIES)
    code = "import sys, tokendrop.families as f; assert not any(m.startswith('tokendrop.families.') for m in sys.modules); print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


def test_register_family_makes_a_family_known_and_refuses_clashes(monkeypatch):
    import tokendrop as td
    from tokendrop import families as table
    from tokendrop.families.llava.llava import LlavaAdapter

    monkeypatch.setattr(table, "_registered", dict(table._registered))

    class Twin(LlavaAdapter):
        name = "llava-twin"
        model_classes = ("VipLlavaForConditionalGeneration",)

    assert td.register_family(Twin) is Twin and Twin in table.families()
    assert table.family_of(architecture="VipLlavaForConditionalGeneration") is Twin

    class Clash(LlavaAdapter):
        name = "clash"

    with pytest.raises(ValueError, match="serves LlavaForConditionalGeneration, which family 'llava' already serves"):
        td.register_family(Clash)
    with pytest.raises(TypeError, match="subclass of tokendrop.families.base.Family"):
        td.register_family(object)


def test_a_broken_family_plugin_is_one_warning(monkeypatch):
    import warnings

    from tokendrop import families as table

    class Entry:
        name, value = "broken", "nowhere:Nothing"

        def load(self):
            raise ImportError("No module named 'nowhere'")

    monkeypatch.setattr(table, "_registered", {})
    monkeypatch.setattr(table, "_plugins_loaded", False)
    monkeypatch.setattr(table.metadata, "entry_points", lambda group: [Entry()] if group == table.ENTRY_POINTS else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = [f.name for f in table.families()]
    assert names == list(table.FAMILIES)
    assert [str(w.message) for w in caught] == [
        "family plugin 'broken' (nowhere:Nothing) not loaded: ImportError: No module named 'nowhere'"]
