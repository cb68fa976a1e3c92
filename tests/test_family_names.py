"""Everything tokendrop knows of a model family lives in its folder (`tokendrop.families.<lineage>`):
no other library module names a family's transformers classes (tests may)."""

from __future__ import annotations

import re
from pathlib import Path

import tokendrop
from tokendrop.families import families

SRC = Path(tokendrop.__file__).parent
FAMILY_FOLDERS = SRC / "families"


def family_class_names() -> set[str]:
    """The transformers class names the registered families declare (model, config, processors)."""
    names = set()
    for family in families():
        names.update(family.model_classes)
        for path in (family.config_class, family.processor_class, family.image_processor_class):
            if path:
                names.add(path.rpartition(":")[2])
    return names


def test_no_module_outside_the_family_folders_names_a_family_class():
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, family_class_names()), key=len, reverse=True)) + r")\b")
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if FAMILY_FOLDERS in path.parents:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for match in pattern.finditer(line):
                found.append(f"{path.relative_to(SRC.parent)}:{number}: {match.group(0)}")
    assert not found, "family classes named outside tokendrop/families/:\n" + "\n".join(found)


def test_the_names_checked_are_the_families_own():
    names = family_class_names()
    assert {"LlavaNextForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "LlavaConfig"} <= names
    assert len(names) >= 2 * len(families())  # each family's own model and config classes (processors may be shared)
