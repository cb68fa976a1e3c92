"""Budget arithmetic and the method contract: pure tensor math, no model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tokendrop.methods import BaseOnly, HiRED, Layout, RandomDrop, SpatialDrop, allocate, budget_tokens
from tokendrop.methods.hired import band_scores, official_budget_split, paper_allocation, region_scores

# (partitions, rate) -> (B, full, sub) from the official code (shared/reference/hired.md).
OFFICIAL_TABLE = {
    (5, 0.1): (288, 144, 144), (5, 0.2): (576, 288, 288), (5, 0.4): (1152, 576, 576),
    (4, 0.1): (230, 115, 115), (4, 0.2): (460, 230, 230), (4, 0.4): (921, 460, 461),
    (3, 0.1): (172, 86, 86), (3, 0.2): (345, 172, 173), (3, 0.4): (691, 345, 346),
}
GRIDS = {5: (2, 2), 4: (1, 3), 3: (1, 2)}


def full_layout(partitions: int, grid: int = 24) -> Layout:
    rows, cols = GRIDS[partitions]
    return Layout(grid=grid, tiles=(rows, cols), crop=(0, rows * grid, 0, cols * grid))


@pytest.mark.parametrize("key", sorted(OFFICIAL_TABLE))
def test_official_budget_table(key):
    assert official_budget_split(key[0], key[1], 0.5) == OFFICIAL_TABLE[key]


@pytest.mark.parametrize("key", sorted(OFFICIAL_TABLE))
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_exact_counts_on_unpadded_canvas(key, variant):
    # With no padding every token is valid: the base gets floor(alpha * B) and the tiles share the
    # rest exactly (the official code's per-tile floors would lose up to k - 1 tokens).
    partitions, rate = key
    total, full, sub = OFFICIAL_TABLE[key]
    layout = full_layout(partitions)
    scores = {"init": torch.rand(partitions, 576, generator=torch.Generator().manual_seed(1))}
    counts = HiRED(rate, variant=variant).counts(layout, scores)
    assert budget_tokens(rate, layout) == total
    assert counts[0] == full and sum(counts[1:]) == sub and sum(counts) == total


def test_fig4_toy_example_floor_arithmetic():
    assert paper_allocation(100, 0.5, [0.32, 0.08, 0.58, 0.02]) == [16, 4, 29, 1]


def test_allocate_largest_remainder_and_caps():
    assert allocate(10, [1.0, 1.0, 1.0], [10, 10, 10]) == [4, 3, 3]  # leftover to the lower index
    assert allocate(10, [0.9, 0.1], [5, 10]) == [5, 5]  # the capped share's excess moves on
    assert allocate(10, [0.0, 0.0], [3, 9]) == [3, 7]  # no weight: split by free room
    assert allocate(50, [1.0, 2.0], [4, 5]) == [4, 5]  # never more than the capacity
    assert allocate(0, [1.0], [5]) == [0]


def test_hot_band_rows_0_to_5_official_vs_paper():
    # Layer-0 attention only on flattened rows 0-5 of the 24x24 base grid (the top quarter); with
    # alpha 0.75 the official code binarises the top (1 - 0.75) * 576 = 144 tokens: exactly those rows.
    layout = full_layout(5)
    init = torch.zeros(576)
    init[: 6 * 24] = 1.0
    assert band_scores(init, 4, 0.75).tolist() == [144.0, 0.0, 0.0, 0.0]  # all in band 0
    assert region_scores(init, layout).tolist() == [72.0, 72.0, 0.0, 0.0]  # top-left and top-right
    scores = {"init": init[None].expand(5, -1)}
    # B = 576: the base keeps floor(0.75 * 576) = 432, the tiles share 144.
    assert HiRED(0.2, alpha=0.75, variant="official").counts(layout, scores) == [432, 144, 0, 0, 0]
    assert HiRED(0.2, alpha=0.75, variant="paper").counts(layout, scores) == [432, 72, 72, 0, 0]


def test_tokens_in_padding_are_never_candidates():
    # A wide image on a 2x2 canvas: rows 0-5 and 18-23 of each tile column are padding.
    layout = Layout(grid=12, tiles=(2, 2), crop=(6, 18, 0, 24))
    valid = layout.valid()
    init = torch.rand(5, 144)
    final = torch.rand(5, 144)
    final[1:][~valid[1:]] = 10.0  # padding looks most attractive, must still be skipped
    keep = HiRED(0.4).select(layout, {"init": init, "final": final})
    for p, k in enumerate(keep):
        assert valid[p, k].all()
    assert sum(k.numel() for k in keep) == budget_tokens(0.4, layout)


LAYOUTS = [
    Layout(grid=8),
    full_layout(5, grid=8),
    Layout(grid=8, tiles=(1, 2), crop=(2, 6, 0, 16)),
    Layout(grid=8, tiles=(3, 1), crop=(0, 24, 3, 5)),
    Layout(grid=8, tiles=(2, 2), crop=(5, 11, 0, 16)),
]
METHODS = [HiRED, lambda b: HiRED(b, variant="official"), lambda b: HiRED(b, alpha=0.0), lambda b: HiRED(b, alpha=1.0),
           RandomDrop, SpatialDrop]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("make", METHODS)
@pytest.mark.parametrize("budget", [0.05, 0.1, 0.2, 0.4, 0.77, 1.0])
def test_method_contract(layout, make, budget):
    method = make(budget)
    gen = torch.Generator().manual_seed(0)
    scores = {"init": torch.rand(layout.num_partitions, layout.patches, generator=gen),
              "final": torch.rand(layout.num_partitions, layout.patches, generator=gen)}
    keep = method.select(layout, scores)
    valid = layout.valid()
    assert len(keep) == layout.num_partitions
    assert sum(k.numel() for k in keep) == budget_tokens(budget, layout) == method.num_tokens(layout)
    for p, k in enumerate(keep):
        assert (k[1:] > k[:-1]).all(), "indices strictly increasing (spatial order)"
        assert valid[p, k].all()
    again = method.select(layout, scores)
    assert all(torch.equal(a, b) for a, b in zip(keep, again)), "deterministic"


def test_full_budget_keeps_every_valid_token():
    layout = Layout(grid=8, tiles=(1, 2), crop=(2, 6, 0, 16))
    for method in (HiRED(1.0), RandomDrop(1.0), SpatialDrop(1.0)):
        keep = method.select(layout, {"init": torch.rand(3, 64), "final": torch.rand(3, 64)})
        assert [k.numel() for k in keep] == layout.valid_counts()


def test_newline_count_is_known_before_encoding():
    layout = Layout(grid=8, tiles=(1, 2), crop=(2, 6, 0, 16))
    assert HiRED(0.2, keep_newlines=True).num_tokens(layout) == budget_tokens(0.2, layout) + 4
    assert BaseOnly().num_tokens(layout) == 64


def test_ties_break_by_lower_index():
    layout = Layout(grid=4)
    keep = HiRED(0.25).select(layout, {"init": torch.zeros(1, 16), "final": torch.zeros(1, 16)})
    assert keep[0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=0.0), "budget must be in (0, 1]"),
    (dict(budget=1.5), "budget must be in (0, 1]"),
    (dict(budget=float("nan")), "budget must be in (0, 1]"),
    (dict(budget=0.2, alpha=-0.1), "alpha must be in [0, 1]"),
    (dict(budget=0.2, alpha=2), "alpha must be in [0, 1]"),
    (dict(budget=0.2, variant="fast"), "variant must be one of"),
])
def test_bad_hired_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        HiRED(**kwargs)


def test_budget_type_error():
    with pytest.raises(TypeError, match="budget must be a number"):
        HiRED("0.2")


def test_methods_import_without_transformers():
    code = "import sys; sys.modules['transformers'] = None; import tokendrop.methods as m; print(m.HiRED(0.2))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_spatial_drop_spreads_over_rows_and_columns():
    layout = Layout(grid=24)
    keep = SpatialDrop(0.2).select(layout)[0]  # floor(0.2 * 576) = 115 tokens
    rows, cols = keep // 24, keep % 24
    assert keep.numel() == 115
    assert rows.unique().numel() >= 10 and cols.unique().numel() >= 10  # a 2-D lattice, not stripes
    # per used row the counts differ by at most one
    per_row = torch.bincount(rows)[rows.unique()]
    assert per_row.max() - per_row.min() <= 1
