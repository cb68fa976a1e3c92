"""DART's selection on hand-checkable inputs, its edge cases and its option checks (no model)."""

from __future__ import annotations

import pytest
import torch

import tokendrop as td

# four image tokens and one text token in 2-D: cosines to image pivot t1 = (0, 1) are
# t0: 0, t2: 0.707, t3: 0.447; to the text pivot (0, -1): t0: 0, t2: -0.707, t3: -0.447
IMAGE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]])
IMAGE_NORMS = torch.tensor([1.0, 3.0, 2.0, 0.0])  # t1 is the image pivot
TEXT = torch.tensor([[0.0, -1.0]])
TEXT_NORMS = torch.tensor([5.0])
ONE_EACH = td.DART(pivot_image_token=1, pivot_text_token=1)


@pytest.mark.parametrize("keep, expected", [
    (0, []),
    (1, [1]),  # M <= image pivots: the top M by key norm
    (2, [1, 0]),  # one token to share: the first pivot (t1) takes its least similar, t0
    (3, [1, 0, 2]),  # t1 takes t0; the text pivot takes t2 (-0.707 < -0.447)
    (4, [1, 0, 3, 2]),  # 3 = 2 * 1 + 1: t1 takes two (t0, then t3), the text pivot one (t2)
])
def test_worked_example(keep, expected):
    assert ONE_EACH.select(IMAGE_NORMS, TEXT_NORMS, IMAGE, TEXT, keep).tolist() == expected


def test_pivots_take_turns_in_sequence_order_not_by_norm():
    # image pivots t2 (norm 3) and t1 (norm 2): t1 comes first in the sequence, so it chooses first
    method = td.DART(pivot_image_token=2, pivot_text_token=0)
    norms = torch.tensor([1.0, 2.0, 3.0, 0.0])
    # t1 = (0, 1) takes t0 (cosine 0 < 0.447 for t3); t2 = (1, 1), choosing first, would take t3 (-0.316)
    assert method.select(norms, TEXT_NORMS[:0], IMAGE, TEXT[:0], 3).tolist() == [1, 2, 0]


def test_ties_go_to_the_lower_index():
    states = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # t0 and t2 both orthogonal to the pivot t1
    norms = torch.tensor([1.0, 1.0, 1.0])  # all equal: the image pivot is t0
    method = td.DART(pivot_image_token=1, pivot_text_token=0)
    assert method.select(norms, norms[:0], states, states[:0], 2).tolist() == [0, 2]  # cos(t0, t2) = -1
    pivot_t1 = torch.tensor([0.0, 1.0, 0.0])
    assert method.select(pivot_t1, norms[:0], states, states[:0], 2).tolist() == [1, 0]  # t0, t2 tie at 0


def test_no_text_after_the_image_shrinks_the_pivots():
    got = ONE_EACH.select(IMAGE_NORMS, TEXT_NORMS[:0], IMAGE, TEXT[:0], 4)
    assert got.tolist() == [1, 0, 3, 2]  # t1 alone takes all three, least similar first


def test_no_pivot_at_all_keeps_the_top_by_key_norm():
    method = td.DART(pivot_image_token=0, pivot_text_token=4)
    assert method.select(IMAGE_NORMS, TEXT_NORMS[:0], IMAGE, TEXT[:0], 3).tolist() == [1, 2, 0]


@pytest.mark.parametrize("pivots", [(4, 4), (1, 0), (0, 3), (6, 2), (0, 0)])
def test_exact_count_no_repeats_and_image_pivots_kept(pivots):
    generator = torch.Generator().manual_seed(0)
    n, t = 40, 5
    method = td.DART(pivot_image_token=pivots[0], pivot_text_token=pivots[1])
    norms, text_norms = torch.rand(n, generator=generator), torch.rand(t, generator=generator)
    states, text_states = torch.randn(n, 8, generator=generator), torch.randn(t, 8, generator=generator)
    top = set(torch.argsort(norms, descending=True)[: pivots[0]].tolist())
    for keep in range(n + 1):
        got = method.select(norms, text_norms, states, text_states, keep).tolist()
        assert len(got) == len(set(got)) == keep and all(0 <= i < n for i in got)
        assert top <= set(got) or keep < len(top)


def test_counts_follow_the_drop_ratio():
    assert td.DART().keep_counts(576, 32) == [(2, 128)]  # round(576 * 0.222); the official keeps 132
    assert td.DART(k=3, drop=0.5).keep_counts(7, 8) == [(3, 4)]  # round(3.5): half to even
    assert td.DART(drop=0.0).keep_counts(9, 4) == [(2, 9)]


@pytest.mark.parametrize("options, error, needle", [
    ({"k": -1}, ValueError, "k must be an int in"),
    ({"drop": 1.0}, ValueError, r"drop must be in \[0, 1\)"),
    ({"pivot_image_token": -1}, ValueError, "pivot_image_token must be"),
    ({"pivot_text_token": 1.5}, TypeError, "pivot_text_token must be"),
    ({"positions": "shifted"}, ValueError, "positions must be one of"),
])
def test_bad_options_are_named(options, error, needle):
    with pytest.raises(error, match=needle):
        td.DART(**options)


def test_k_must_be_below_the_depth():
    with pytest.raises(ValueError, match=r"k must be in \[0, 4\)"):
        td.DART(k=4).boundaries(4)
