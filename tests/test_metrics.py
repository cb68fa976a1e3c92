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
    vqa_normalize,
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


def test_vqa_accuracy_is_the_leave_one_out_average():
    # 10 annotators: 3 said "cat", 7 said "dog". Each of the 10 subsets leaves one annotator out (9 left).
    answers = ["cat"] * 3 + ["dog"] * 7
    # "cat": leaving out a cat (3 subsets) leaves 2 cats -> min(2/3, 1); leaving out a dog (7) leaves 3 -> 1.
    #        (3 * 2/3 + 7 * 1) / 10 = 9/10
    assert vqa_accuracy("cat", answers) == pytest.approx(0.9)
    # "dog": 6 or 7 dogs are left in every subset -> 1 each -> 1.0
    assert vqa_accuracy("dog", answers) == 1.0
    assert vqa_accuracy("bird", answers) == 0.0


@pytest.mark.parametrize("agree, expected", [
    (1, 0.3),  # its own subset: 0 left; the 9 others: 1 left -> 1/3.  9 * 1/3 / 10 = 0.3
    (2, 0.6),  # 2 subsets with 1 left (1/3), 8 with 2 left (2/3): (2/3 + 16/3) / 10 = 0.6
    (3, 0.9),  # 3 subsets with 2 left, 7 with 3: (2 + 7) / 10 = 0.9
    (4, 1.0),  # at least 3 left in every subset
])
def test_vqa_accuracy_with_k_of_10_annotators(agree, expected):
    answers = ["yes"] * agree + ["no"] * (10 - agree)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected)


def test_vqa_accuracy_other_counts_of_answers():
    assert vqa_accuracy("7", ["7", "7", "7"]) == pytest.approx(2 / 3)  # every subset leaves 2 of 3
    assert vqa_accuracy("7", ["7"] * 4) == 1.0
    assert vqa_accuracy("7", "7") == 0.0  # one reference: nothing is left when it is left out
    # 5 answers, "cat" x3: cat subsets (3) leave 2 -> 2/3; the others (2) leave 3 -> 1: (2 + 2) / 5 = 0.8
    assert vqa_accuracy("cat", ["cat", "cat", "dog", "cat", "kitten"]) == pytest.approx(0.8)


def test_vqa_accuracy_processes_prediction_and_answers():
    answers = ["two"] * 4 + ["2 dogs"] * 6
    assert vqa_accuracy("2", answers) == 1.0  # "two" -> "2" on the annotators' side
    assert vqa_accuracy("Two dogs!", answers) == 1.0  # "!" at the end: replaced by a space, then stripped
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("do not", ["don't"] * 10) == 0.0  # the official table restores apostrophes only


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),
    ("none", "0"),
    ("eleven", "eleven"),  # the official number words stop at ten
    ("The Red Circle.", "red circle"),
    ("an apple!", "apple"),
    ("3.5", "3.5"),
    ("5.", "5"),  # a period is removed unless a digit follows it
    ("1,000", "1000"),  # a digit-comma-digit: every punctuation mark is deleted, not spaced
    ("red,blue", "red blue"),  # else a mark that touches no space becomes a space
    ("red, blue", "red blue"),  # and one next to a space is deleted
    ("dont", "don't"),
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("Im", "im"),  # the official table's capitalised entries never match a lowercased word
    ("it's", "it's"),  # apostrophes are not punctuation here
    ("\tyes\n", "yes"),
    ("", ""),
])
def test_vqa_normalize(raw, expected):
    assert vqa_normalize(raw) == expected


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
    assert relaxed_accuracy("95", ["100"]) == 1.0  # |95 - 100| / 100 = 0.05: the bound counts
    assert relaxed_accuracy("1,020", ["1000"]) == 0.0  # float() does not read "1,020": text, not equal
    assert relaxed_accuracy("12%", ["0.12"]) == 1.0
    assert relaxed_accuracy("0", ["0"]) == 1.0 and relaxed_accuracy("0.0", ["0"]) == 0.0  # a 0 reference: text
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
