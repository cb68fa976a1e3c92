"""The `tokendrop` lmms-eval model's argument checks, which run before anything of lmms-eval's is used: tested
with lmms-eval where it is installed and over a stand-in for its base class elsewhere (#25 row 16)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


@pytest.fixture
def integration(monkeypatch):
    """The module tokendrop.integrations.lmms_eval; without lmms-eval, loaded apart (not in sys.modules) over
    stand-ins for the two names it imports from lmms-eval."""
    name = "tokendrop.integrations.lmms_eval"
    if importlib.util.find_spec("lmms_eval") is not None:
        return importlib.import_module(name)
    stand_ins = {"lmms_eval": {}, "lmms_eval.api": {}, "lmms_eval.api.instance": {"Instance": type("Instance", (), {})},
                 "lmms_eval.api.model": {"lmms": type("lmms", (), {})}}
    for module_name, names in stand_ins.items():
        module = types.ModuleType(module_name)
        module.__dict__.update(names)
        monkeypatch.setitem(sys.modules, module_name, module)
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batch_size_is_a_positive_integer(integration):
    # lmms-eval hands --batch_size over as the command line's text ("8"), or its default 1.
    assert [integration.check_batch_size(v) for v in (1, "8", " 4 ", 16)] == [1, 8, 4, 16]
    for bad in (0, "0", -2, "-2", "x", "", 2.5, "2.5", None, True):
        with pytest.raises(ValueError, match=rf"^batch_size must be a positive integer \(e.g. --batch_size 8\), got {bad!r}$"):
            integration.check_batch_size(bad)


def test_batch_size_auto_is_refused_with_the_reason(integration):
    for auto in ("auto", "auto:4", "AUTO"):
        with pytest.raises(ValueError, match=rf"^batch_size must be a positive integer, got '{auto}': 'auto' \(search for the "
                                             r"largest batch that fits\) is not supported: .* pass a number, e.g. --batch_size 8$"):
            integration.check_batch_size(auto)


@pytest.mark.parametrize("batch_size", [0, "0", "auto", "auto:2", "-1"])
def test_a_bad_batch_size_fails_before_the_model_loads(integration, batch_size):
    # Before: int("auto") failed after the model had loaded, and 0 only in generate_until ("range() arg 3 must not be zero").
    with pytest.raises(ValueError, match="^batch_size must be a positive integer"):
        integration.TokenDrop(pretrained="/no/such/model", method="hired", budget=0.2, batch_size=batch_size)
