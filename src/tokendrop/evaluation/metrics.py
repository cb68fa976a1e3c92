"""VQA answer metrics: pure functions of (prediction, annotator answers) -> score in [0, 1].

Every metric takes ``prediction: str`` and ``answers: str | Sequence[str]`` (one reference or the
list of annotator answers) and returns a float. ``METRICS`` maps names to functions; ``get_metric``
looks one up with a helpful error.

| name              | used by                | rule                                                            |
|-------------------|------------------------|-----------------------------------------------------------------|
| exact_match       | synthetic VQA, GQA     | normalised prediction equals any normalised answer              |
| vqa_accuracy      | VQAv2, TextVQA         | min(#annotators who gave the normalised answer / 3, 1)          |
| anls              | DocVQA, InfographicVQA | max over answers of 1 - NLD (0 when NLD >= 0.5), NLD = edit / max len |
| relaxed_accuracy  | ChartQA                | numbers within 5% of the answer; exact match otherwise          |

Normalisation follows the VQA evaluation convention in a simple form: lowercase, punctuation
removed (a period is kept inside a decimal number, commas inside numbers are dropped), the
articles a/an/the dropped, number words zero..twenty written as digits.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
ARTICLES = {"a", "an", "the"}
_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCT = re.compile(r"[!\"#$%&()*+,\-/:;<=>?@\[\\\]^_`{|}~]")
ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05


def _as_list(answers: str | Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("answers must hold at least one reference answer, got an empty list")
    return answers


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: ``"Two dogs."`` -> ``"2 dogs"``, ``"The 3.5%"`` -> ``"3.5"``."""
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = _NUMBER_COMMA.sub("", text)  # 1,000 -> 1000
    text = text.replace("'", "")  # don't -> dont
    text = _NON_DECIMAL_PERIOD.sub(" ", text)  # keeps 3.5
    text = _PUNCT.sub(" ", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _as_list(answers)))


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """VQA accuracy, simple form: min(number of annotators matching the prediction / 3, 1).

    With fewer than 3 annotator answers a single match is not enough for full credit; pass the
    answer repeated (as the synthetic data does) when there is only one reference.
    """
    pred = normalize_answer(prediction)
    matches = sum(pred == normalize_answer(a) for a in _as_list(answers))
    return min(matches / 3.0, 1.0)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(text.lower().split())


def anls(prediction: str, answers: str | Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity for one question (DocVQA).

    Score = max over answers of ``1 - NLD`` where ``NLD = edit_distance / max(len)``, and 0 when
    ``NLD >= threshold``. Strings are lowercased and whitespace-collapsed (no other normalisation,
    as in the DocVQA evaluation). Averaging over questions gives the dataset ANLS.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    pred = _anls_text(prediction)
    best = 0.0
    for answer in _as_list(answers):
        ref = _anls_text(answer)
        longest = max(len(pred), len(ref))
        nld = levenshtein(pred, ref) / longest if longest else 0.0
        best = max(best, 1.0 - nld if nld < threshold else 0.0)
    return best


def _to_number(text: str) -> float | None:
    text = text.strip().lower().rstrip(".").replace(",", "")
    percent = text.endswith("%")
    try:
        value = float(text.rstrip("%").strip())
    except ValueError:
        return None
    return value / 100.0 if percent else value


def relaxed_accuracy(prediction: str, answers: str | Sequence[str], tolerance: float = RELAXED_TOLERANCE) -> float:
    """ChartQA relaxed accuracy: numeric answers within ``tolerance`` relative error, else exact match.

    Numbers may carry thousands commas or a percent sign (``"12%"`` == ``"0.12"``). A reference of 0
    needs an exact 0. Non-numeric answers are compared case-insensitively after stripping.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    pred_num = _to_number(prediction)
    for answer in _as_list(answers):
        ref_num = _to_number(answer)
        if pred_num is not None and ref_num is not None:
            if ref_num == 0.0:
                if pred_num == 0.0:
                    return 1.0
            elif abs(pred_num - ref_num) / abs(ref_num) <= tolerance:
                return 1.0
        elif prediction.strip().lower() == answer.strip().lower():
            return 1.0
    return 0.0


METRICS = {
    "exact_match": exact_match,
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
}


def get_metric(name: str):
    """The metric function called ``name``; ValueError with a suggestion for an unknown name."""
    if name in METRICS:
        return METRICS[name]
    close = difflib.get_close_matches(name, list(METRICS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ValueError(f"unknown metric '{name}'; {hint}available: {', '.join(sorted(METRICS))}")
