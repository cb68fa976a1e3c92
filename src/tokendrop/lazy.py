"""Heavy modules imported on first use.

torch and transformers take seconds to import. The method configs, the registries and the CLI's
`--help`, `env` and `methods` need neither, so the method files read torch through this proxy: the
real import happens at the first attribute access (a method's first selection), and every later
access is a plain attribute lookup.
"""

from __future__ import annotations

import importlib


class LazyModule:
    """A module that is imported when one of its attributes is first read."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        value = getattr(importlib.import_module(self._name), attribute)
        setattr(self, attribute, value)  # next time: found without __getattr__
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch = LazyModule("torch")
