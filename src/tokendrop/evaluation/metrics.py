"""VQA answer metrics: pure functions of (prediction, annotator answers) -> score in [0, 1].

Every metric takes ``prediction: str`` and ``answers: str | Sequence[str]`` (one reference or the
list of annotator answers) and returns a float; a dataset's score is the mean over its questions.
``METRICS`` maps names to functions, ``RULES`` to the one-line rule every results table prints, and
``get_metric`` looks one up with a helpful error.

| name              | used by                | rule                                                                       |
|-------------------|------------------------|----------------------------------------------------------------------------|
| exact_match       | synthetic VQA, GQA     | tokendrop's normalised prediction equals any normalised answer             |
| vqa_accuracy      | VQAv2, TextVQA         | official: mean over leave-one-out annotator subsets of min(#matches / 3, 1) |
| anls              | DocVQA, InfographicVQA | max over answers of 1 - NLD (0 when NLD >= 0.5), NLD = edit / max length   |
| relaxed_accuracy  | ChartQA                | numbers within 5% of a non-zero answer; exact match (any case) otherwise   |

The last three follow the definitions of their benchmarks (references in each function), so scores
compare with published tables; where widely used evaluation code differs from the definition at an
edge, the docstring says so.
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
    """tokendrop's lenient normalisation for `exact_match`: ``"Two dogs."`` -> ``"2 dogs"``, ``"The 3.5%"`` -> ``"3.5"``.

    Lowercase; every punctuation mark and apostrophe removed, except a period inside a decimal
    number ("1,000" -> "1000", "don't" -> "dont"); articles dropped; number words zero..twenty as
    digits. `vqa_accuracy` uses the official processing instead (`vqa_normalize`).
    """
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


# ---- VQA accuracy (VQAv2, TextVQA): the official answer processing and leave-one-out average ----------------
# Antol et al. 2015 (arXiv 1505.00468) and the VQA evaluation script of the VQA API (vqaEval.py); the same
# processing runs on the VQAv2 / TextVQA evaluation servers and in lmms-eval.
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
VQA_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
VQA_ARTICLES = ("a", "an", "the")
# The contractions of the official table, written with their apostrophes; the table maps every spelling
# with one apostrophe left out to them ("dont" -> "don't", "couldnt've" and "couldn'tve" -> "couldn't've").
# Words like "shed", "wed", "its", "lets" and "shes" are not in it (they are words of their own), nor are
# its capitalised entries ("Im", "Ive", "Id've"), which never match once the answer is lowercased.
VQA_CONTRACTED = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
    he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
    needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd
    somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
    something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't
    we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll
    who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've
    you'll you're you've
""".split()
VQA_CONTRACTIONS = {
    word[:i] + word[i + 1 :]: word for word in VQA_CONTRACTED for i, ch in enumerate(word) if ch == "'"
}
VQA_ANNOTATORS_FOR_FULL_CREDIT = 3
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a look-ahead (a typo for a look-behind)
# that never fails before a period, so a period is removed unless a digit follows it ("3.5" stays, "5." -> "5").
_VQA_PERIOD = re.compile(r"\.(?!\d)")
_VQA_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def vqa_normalize(text: str) -> str:
    """The official VQA answer processing: ``"Two Dogs!"`` -> ``"2 dogs"``, ``"dont"`` -> ``"don't"``.

    1. newlines and tabs become spaces, the ends are stripped;
    2. each punctuation mark in ``VQA_PUNCTUATION`` is deleted where it touches a space (or anywhere when
       the answer holds a digit-comma-digit such as "1,000"), else replaced by a space; a period is
       deleted unless a digit follows it;
    3. lowercased words: number words zero..ten (and "none") become digits, the articles a/an/the
       are dropped, a contraction written without its apostrophe gets it back.
    Apostrophes stay: "don't" and "dont" match, "do not" does not (as in the official table).
    """
    # 1. whitespace
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # 2. punctuation (decided on the text as it came in, mark by mark)
    delete_all = _VQA_DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if touches_space or delete_all else " ")
    out = _VQA_PERIOD.sub("", out)
    # 3. digits, articles, contractions
    words = [VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """VQA accuracy: min(#annotators who gave the answer / 3, 1), averaged over the leave-one-out subsets.

    With the annotators' answers a_1..a_n (10 in VQAv2 and TextVQA), leaving out a_i leaves n-1
    answers, of which m_i match the prediction; the score is mean_i min(m_i / 3, 1), answers and
    prediction both processed by `vqa_normalize`. With 10 answers, a prediction given by 1, 2, 3 or
    >= 4 annotators scores 0.3, 0.6, 0.9 or 1.0. A single reference scores 0 (nothing is left when it
    is left out): use `exact_match` for data with one reference answer.
    """
    pred = vqa_normalize(prediction)
    refs = [vqa_normalize(a) for a in _as_list(answers)]
    matches = sum(ref == pred for ref in refs)
    # leaving out annotator i removes one match if a_i is one
    per_subset = [min((matches - (ref == pred)) / VQA_ANNOTATORS_FOR_FULL_CREDIT, 1.0) for ref in refs]
    return sum(per_subset) / len(per_subset)


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
    """Average Normalised Levenshtein Similarity for one question (ST-VQA, arXiv 1905.13648; DocVQA, arXiv 2007.00398).

    Score = max over answers of ``1 - NLD`` where ``NLD = edit_distance / max(len)`` of the two
    strings, and 0 when ``NLD >= threshold`` (the definition: a similarity counts while NLD < 0.5).
    Strings are lowercased, stripped and whitespace-collapsed (no other normalisation, as in the
    DocVQA evaluation). Averaging over questions gives the dataset ANLS.
    Known difference: the evaluation code lmms-eval uses (from Qwen-VL) keeps a score of exactly
    0.5 (NLD == 0.5) and measures the lengths before collapsing whitespace.
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


def _chart_number(text: str) -> float | None:
    """"12%" -> 0.12, "3.5" -> 3.5, anything float() does not read -> None (as the reference code)."""
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: str | Sequence[str], tolerance: float = RELAXED_TOLERANCE) -> float:
    """ChartQA relaxed accuracy (Masry et al. 2022, arXiv 2203.10244, section 5.1, after PlotQA).

    "Correct if within 5% of the gold answer" for numeric answers, exact match for the others.
    As in the reference code (pix2struct's, used by lmms-eval): a number is what ``float()`` reads,
    with a trailing "%" dividing by 100 (``"12%"`` == ``"0.12"``); thousands commas are not read
    (``"1,020"`` is text); a reference of 0 needs the same text; text compares case-insensitively.
    Leading and trailing spaces are stripped. With several answers, any one counts.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    pred = prediction.strip()
    pred_num = _chart_number(pred)
    for answer in _as_list(answers):
        ref = answer.strip()
        ref_num = _chart_number(ref)
        if pred_num is not None and ref_num:  # a number against a non-zero number
            correct = abs(pred_num - ref_num) / abs(ref_num) <= tolerance
        else:
            correct = pred.lower() == ref.lower()
        if correct:
            return 1.0
    return 0.0


METRICS = {
    "exact_match": exact_match,
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
}


RULES = {
    "exact_match": "exact match: tokendrop's normalised prediction equals one of the answers",
    "vqa_accuracy": "VQA accuracy (official, VQAv2/TextVQA): min(#annotators who gave the answer / 3, 1), "
                    "averaged over the leave-one-out subsets of annotators, answers processed as the VQA evaluation does",
    "anls": "ANLS (DocVQA): 1 - normalised edit distance to the closest answer, 0 when that distance is >= 0.5",
    "relaxed_accuracy": "relaxed accuracy (ChartQA): numbers within 5% of the answer, exact match otherwise",
}


def get_metric(name: str):
    """The metric function called ``name``; ValueError with a suggestion for an unknown name."""
    if name in METRICS:
        return METRICS[name]
    close = difflib.get_close_matches(name, list(METRICS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ValueError(f"unknown metric '{name}'; {hint}available: {', '.join(sorted(METRICS))}")
