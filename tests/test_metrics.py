"""Answer metrics on hand-made cases."""

from __future__ import annotations

import pytest

from tokendrop.evaluation.metrics import (
    METRICS,
    anls,
    exact_match,
    get_metric,
    levenshtein,
    normalize_answer,
    relaxed_accuracy,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("  The Red Circle. ", "red circle"),
        ("an apple!", "apple"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("yes.", "yes"),
        ("don't", "dont"),
        ("ten dogs, a cat", "10 dogs cat"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match():
    assert exact_match("Seven", ["7"]) == 1.0
    assert exact_match("the red", "red") == 1.0
    assert exact_match("blue", ["red", "green"]) == 0.0


def test_vqa_accuracy_counts_annotators():
    answers = ["cat", "cat", "dog", "cat", "kitten"]
    assert vqa_accuracy("cat", answers) == 1.0  # 3 matches -> min(3/3, 1)
    assert vqa_accuracy("dog", answers) == pytest.approx(1 / 3)
    assert vqa_accuracy("Kitten.", answers) == pytest.approx(1 / 3)
    assert vqa_accuracy("bird", answers) == 0.0
    assert vqa_accuracy("two", ["2", "2"]) == pytest.approx(2 / 3)


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("same", "same") == 0


def test_anls():
    assert anls("Invoice", ["invoice"]) == 1.0  # case-insensitive
    assert anls("invoce", ["invoice"]) == pytest.approx(1 - 1 / 7)  # one deletion over 7 chars
    assert anls("abc", ["xyz"]) == 0.0  # NLD 1 >= 0.5
    assert anls("abcd", ["abxy"]) == 0.0  # NLD exactly 0.5 -> 0
    assert anls("abcde", ["abxde", "zzzzz"]) == pytest.approx(0.8)  # best answer counts
    assert anls("", [""]) == 1.0
    with pytest.raises(ValueError, match="threshold"):
        anls("a", "a", threshold=0.0)


def test_relaxed_accuracy():
    assert relaxed_accuracy("104", ["100"]) == 1.0  # 4% off
    assert relaxed_accuracy("106", ["100"]) == 0.0  # 6% off
    assert relaxed_accuracy("1,020", ["1000"]) == 1.0
    assert relaxed_accuracy("12%", ["0.12"]) == 1.0
    assert relaxed_accuracy("0", ["0"]) == 1.0 and relaxed_accuracy("0.01", ["0"]) == 0.0
    assert relaxed_accuracy("Yes", ["yes"]) == 1.0
    assert relaxed_accuracy("no", ["yes", "no"]) == 1.0
    assert relaxed_accuracy("abc", ["12"]) == 0.0


def test_empty_answer_list_is_an_error():
    with pytest.raises(ValueError, match="answers"):
        exact_match("x", [])


def test_registry():
    assert set(METRICS) == {"exact_match", "vqa_accuracy", "anls", "relaxed_accuracy"}
    assert get_metric("anls") is anls
    with pytest.raises(ValueError, match=r"unknown metric 'anl'; did you mean 'anls'\? available: anls, exact_match"):
        get_metric("anl")
    with pytest.raises(ValueError, match="unknown metric 'zzz'; available"):
        get_metric("zzz")
