"""The method contracts, checked for every method in the registry (a new method is tested here unedited)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tokendrop.methods import Layout, budget_tokens
from tokendrop.methods.base import FEATURE_KINDS, POSITION_RULES
from tokendrop.registry import method_class, method_names

PRE = [n for n in method_names() if method_class(n).stage == "pre"]
IN = [n for n in method_names() if method_class(n).stage == "in"]
LAYOUTS = [
    Layout(grid=8),  # one partition (LLaVA-1.5)
    Layout(grid=8, tiles=(2, 2), crop=(0, 16, 0, 16)),  # no padding
    Layout(grid=8, tiles=(1, 2), crop=(2, 6, 0, 16)),  # wide image: rows cropped
    Layout(grid=6, tiles=(3, 1), crop=(0, 18, 1, 5)),  # tall image: columns cropped
    Layout(grid=24, tiles=(2, 2), crop=(0, 48, 5, 43)),
]


def build(name: str, budget: float):
    from tokendrop.registry import build_methods

    return build_methods(name, budget=budget)[0]


def scores(method, layout: Layout, seed: int = 0) -> dict:
    """Random inputs of every kind the method reads: (P, N) scores in [0, 1), (P, N, 8) features."""
    gen = torch.Generator().manual_seed(seed)
    shape = (layout.num_partitions, layout.patches)
    return {key: torch.randn(*shape, 8, generator=gen) if score.kind in FEATURE_KINDS else torch.rand(*shape, generator=gen)
            for key, score in method.scores().items()}


def test_every_method_is_a_frozen_dataclass_with_a_unique_name():
    classes = {method_class(n) for n in method_names()}
    for cls in classes:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls
        assert cls.stage in ("pre", "in") and cls.name and cls.__doc__
    assert len({c.name for c in classes}) == len(classes)


@pytest.mark.parametrize("name", PRE)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay.tiles}-{lay.crop}")
@pytest.mark.parametrize("budget", [0.05, 0.2, 0.5, 1.0])
def test_pre_llm_selects_exactly_num_tokens_sorted_valid_deterministic(name, layout, budget):
    method = build(name, budget)
    keep = method.select(layout, scores(method, layout))
    again = method.select(layout, scores(method, layout))
    valid = layout.valid()
    assert len(keep) == layout.num_partitions
    assert sum(k.numel() for k in keep) == method.num_tokens(layout)  # how many == which, exactly
    assert [k.numel() for k in keep] == method.counts(layout, scores(method, layout))
    for p, k in enumerate(keep):
        assert k.dtype == torch.long and bool((k[1:] > k[:-1]).all()), "sorted, no repeats"
        assert bool(valid[p, k].all()), "only tokens that survive unpadding"
    assert all(torch.equal(a, b) for a, b in zip(keep, again)), "deterministic"
    if "budget" in type(method).options() and type(method).options()["budget"].default is dataclasses.MISSING:
        assert method.num_tokens(layout) == budget_tokens(budget, layout)


@pytest.mark.parametrize("name", PRE)
def test_pre_llm_full_budget_keeps_every_valid_token(name):
    layout = LAYOUTS[2]
    method = build(name, 1.0)
    keep = method.select(layout, scores(method, layout))
    kept = torch.zeros_like(layout.valid())
    for p, k in enumerate(keep):
        kept[p, k] = True
    if method.num_tokens(layout) == sum(layout.valid_counts()):
        assert torch.equal(kept, layout.valid())


@pytest.mark.parametrize("name", IN)
@pytest.mark.parametrize("depth", [4, 8, 32])
@pytest.mark.parametrize("n", [0, 1, 7, 576])
def test_in_llm_schedule_is_consistent(name, depth, n):
    method = method_class(name)()
    bounds = method.boundaries(depth)
    assert list(bounds) == sorted(set(bounds)) and 0 <= bounds[0] and bounds[-1] < depth
    counts = method.keep_counts(n, depth)
    assert [b for b, _ in counts] == list(bounds)
    kept = [k for _, k in counts]
    assert all(0 <= k <= n for k in kept) and kept == sorted(kept, reverse=True), "never grows back"
    per_layer = method.layer_counts(n, depth)
    assert len(per_layer) == depth and per_layer[0] == (n if bounds[0] > 0 else kept[0])
    fractions = method.layer_fractions(depth)
    assert all(abs(n * f - c) < 1 for f, c in zip(fractions, per_layer)), "real-valued and integer counts agree"
    assert method.positions in (None, *POSITION_RULES)  # None: the model's own rule
    for b in bounds:
        assert method.ranking_layer(b) in (b - 1, b, None)


@pytest.mark.parametrize("name", IN)
def test_in_llm_random_ranking_when_no_layer_ranks(name):
    method = method_class(name)()
    fields = type(method).options()
    if "k" in fields:  # FastV's k = 0 has no attention to rank by
        method = dataclasses.replace(method, k=0)
    if method.ranking_layer(method.boundaries(8)[0]) is not None:
        pytest.skip(f"{name} always ranks by attention")
    image = torch.tensor([[False, True, True, True], [True, True, False, False]])
    a, b = method.random_scores(image), method.random_scores(image)
    assert torch.equal(a, b) and a.shape == image.shape and bool((a[~image] == 0).all())


MERGING = [n for n in PRE if method_class(n).merges]


@pytest.mark.parametrize("name", MERGING)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay.tiles}-{lay.crop}")
@pytest.mark.parametrize("budget", [0.05, 0.2, 1.0])
@pytest.mark.parametrize("cls", [False, True])
def test_merging_feeds_exactly_num_tokens_from_valid_tokens(name, layout, budget, cls):
    method = build(name, budget)
    inputs = scores(method, layout)
    merged = method.merge(layout, inputs, cls)
    valid = layout.valid()
    assert len(merged) == layout.num_partitions
    assert sum(m.num_tokens for m in merged) == method.num_tokens(layout)  # [CLS] states, kept and merged rows
    for p, m in enumerate(merged):
        used = torch.cat([m.keep, m.anchors])
        assert bool(valid[p, used].all()) and used.unique().numel() == used.numel(), "distinct valid patches"
        assert m.rows.shape[0] == m.anchors.numel() and m.rows.dtype == torch.float32
    if budget == 1.0:  # the stock model: every valid patch, nothing merged, no [CLS]
        assert all(not m.cls and m.rows.numel() == 0 for m in merged)
        assert [m.keep.numel() for m in merged] == layout.valid_counts()
