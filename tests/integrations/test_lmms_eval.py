"""The `tokendrop` model of lmms-eval: its base class and request objects, and lmms-eval's own CLI on a local task.

Runs where lmms-eval is installed (.ci/run builds that environment: see its last block); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the last block of .ci/run installs it)")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402

from tokendrop.cli import main  # noqa: E402
from tokendrop.data import load_dataset  # noqa: E402
from tokendrop.integrations.lmms_eval import TokenDrop, cut_at, generation_settings, manifest  # noqa: E402
from tokendrop.registry import method_names  # noqa: E402

TASKS = Path(__file__).resolve().parents[2] / "src" / "tokendrop" / "integrations" / "lmms_eval_tasks"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tokendrop.data.synth import generate_dataset

    folder = tmp_path_factory.mktemp("synth")
    generate_dataset(folder, n=6, seed=7)
    return folder


def _requests(samples, gen_kwargs: dict, task="synth", split="test") -> list:
    """generate_until requests as lmms-eval builds them: (context, generation kwargs, doc_to_visual, doc_id, task, split)."""
    return [Instance(request_type="generate_until", arguments=(s.question, dict(gen_kwargs), lambda doc: [doc.load_image()], i,
                                                                 task, split), idx=0, metadata={"task": task, "doc_id": i, "repeats": 1})
            for i, s in enumerate(samples)]


def _model(folder, batch_size, **model_args) -> TokenDrop:
    return TokenDrop(pretrained=str(folder), batch_size=batch_size, **model_args)


def test_registered_through_the_entry_point_group():
    if not any(ep.name == "tokendrop" for ep in metadata.entry_points(group="lmms_eval.models")):
        pytest.skip("tokendrop's entry points come with `pip install` (not with PYTHONPATH)")
    from lmms_eval.models import get_model

    assert manifest().simple_class_path == "tokendrop.integrations.lmms_eval.TokenDrop"
    assert get_model("tokendrop") is TokenDrop and issubclass(TokenDrop, lmms)


def test_generate_until_answers_like_tokendrop_eval_at_any_batch_size(tiny_folder, data, tmp_path):
    folder, _ = tiny_folder
    samples = load_dataset(data)
    assert main(["eval", "--data", str(data), "--model", str(folder), "--method", "hired", "--budget", "0.2",
                 "--max-new-tokens", "3", "--batch-size", "3", "--no-progress", "--json", str(tmp_path / "r.jsonl")]) == 0
    expected = [p["prediction"] for p in json.loads((tmp_path / "r.jsonl").read_text())["predictions"]]
    for batch_size in (1, 4):
        lm = _model(folder, batch_size, method="hired", budget=0.2)
        lm.task_dict = {"synth": {"test": samples}}
        assert lm.generate_until(_requests(samples, {"max_new_tokens": 3, "temperature": 0})) == expected
        assert len(lm.visual_tokens) == len(samples) and max(lm.visual_tokens) < 100  # HiRED's budget, not ~250


@pytest.mark.parametrize("name", method_names())
def test_every_method_through_model_args_answers_like_tokendrop_eval(name, tiny_folder, data, clip_folder, tmp_path):
    # `--model_args method=NAME,budget=0.2` (CDPruner: clip=PATH too), batch 2: the answers of `tokendrop eval`.
    folder, _ = tiny_folder
    samples = load_dataset(data)[:4]
    options = {"clip": str(clip_folder)} if name == "cdpruner" else {}
    argv = ["--method-args", f"clip={clip_folder}"] if options else []
    assert main(["eval", "--data", str(data), "--model", str(folder), "--method", name, "--budget", "0.2", *argv,
                 "--limit", "4", "--max-new-tokens", "3", "--batch-size", "2", "--no-progress", "--json", str(tmp_path / "r.json")]) == 0
    expected = [p["prediction"] for p in json.loads((tmp_path / "r.json").read_text())["predictions"]]
    lm = _model(folder, 2, method=name, budget=0.2, **options)
    lm.task_dict = {"synth": {"test": samples}}
    assert lm.generate_until(_requests(samples, {"max_new_tokens": 3, "temperature": 0})) == expected


def test_generation_settings_follow_lmms_eval_conventions():
    assert generation_settings({"until": "\n", "max_new_tokens": 16, "image_aspect_ratio": "pad"}, 128) == (
        {"max_new_tokens": 16, "num_beams": 1, "do_sample": False}, ["\n"])
    settings, until = generation_settings({"temperature": 0.7, "top_p": 0.9}, 128)
    assert settings == {"max_new_tokens": 128, "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert until == [] and cut_at("red\nblue ASSISTANT:", ["ASSISTANT:", "\n"]) == "red"


def test_loglikelihood_under_every_kind_of_method(tiny_folder, data):
    folder, _ = tiny_folder
    samples = load_dataset(data)[:2]
    requests = [Instance(request_type="loglikelihood", arguments=(s.question, " yes", lambda doc: [doc.load_image()], i,
                                                                  "synth", "test"), idx=0, metadata={"task": "synth", "doc_id": i, "repeats": 1})
                for i, s in enumerate(samples)]
    for args in ({}, {"method": "hired", "budget": 0.2}, {"method": "fastv"}):
        lm = _model(folder, 1, **args)
        lm.task_dict = {"synth": {"test": samples}}
        scores = lm.loglikelihood(requests)
        assert len(scores) == 2 and all(score < 0 and isinstance(greedy, bool) for score, greedy in scores)


def test_bad_model_args_fail_before_loading():
    with pytest.raises(ValueError, match="'alpah' is not an option of hired"):
        TokenDrop(pretrained="/no/such/model", method="hired", budget=0.2, alpah=0.5)


def test_batch_size_0_or_auto_is_refused_with_a_clear_message(tiny_folder):
    # #25 row 16: as lmms-eval's CLI builds the model (its --batch_size is text). Before: "auto" was int()'s
    # "invalid literal" after the model had loaded, 0 a "range() arg 3 must not be zero" in generate_until.
    folder, _ = tiny_folder
    for batch_size, reason in (("0", r" \(e.g. --batch_size 8\), got '0'$"), ("auto", ", got 'auto': 'auto' .* is not supported")):
        with pytest.raises(ValueError, match=f"^batch_size must be a positive integer{reason}"):
            TokenDrop.create_from_arg_string(f"pretrained={folder},method=hired,budget=0.2",
                                             {"batch_size": batch_size, "max_batch_size": None, "device": None})
    assert TokenDrop.create_from_arg_string(f"pretrained={folder}", {"batch_size": "3"}).batch_size == 3


def test_vqa_processing_matches_lmms_eval():
    # tokendrop's official VQA answer processing and lmms-eval's (VQAv2 task: punctuation, then digits,
    # articles and contractions) make the same answers equal, over random answers built from hard pieces.
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    from tokendrop.evaluation.metrics import vqa_normalize

    theirs = EvalAIAnswerProcessor()
    official = lambda s: theirs.process_digit_article(theirs.process_punctuation(s.replace("\n", " ").replace("\t", " ").strip()))  # noqa: E731
    pieces = ["a", "The", "two", "Ten", "none", "dog", "dont", "don't", "do not", "3.5", "5.", "1,000", "couldnt've",
              "yall'll", "somebodyd", "somebody'd", "Im", "i'm", "hes", "ok!", "(hi)", "a-b", "e.g.", "?", "-", ",", ".", "\n"]
    rng = random.Random(0)
    answers = [rng.choice(["", " "]).join(rng.choice(pieces) for _ in range(rng.randint(1, 4))) for _ in range(3000)]

    def classes(normalize):  # the answers each normalised form groups together
        groups = {}
        for i, answer in enumerate(answers):
            groups.setdefault(normalize(answer), set()).add(i)
        return sorted(sorted(g) for g in groups.values())

    assert classes(vqa_normalize) == classes(official)


def test_lmms_eval_cli_runs_the_tokendrop_model_on_a_local_task(data, tmp_path):
    # lmms-eval's own command line, batch size 4, the bundled model with HiRED at 20%, on the synthetic
    # set read from disk by the task in src/tokendrop/integrations/lmms_eval_tasks: the same answers and
    # scores as `tokendrop eval`.
    cli = Path(sys.executable).parent / "lmms-eval"
    if not any(ep.name == "tokendrop" for ep in metadata.entry_points(group="lmms_eval.models")):
        pytest.skip("tokendrop's entry points come with `pip install` (not with PYTHONPATH)")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([str(cli), "--model", "tokendrop", "--model_args", "method=hired,budget=0.2", "--tasks", "tokendrop_synth",
                          "--include_path", str(TASKS), "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"],
                         cwd=data, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "tokendrop_synth" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())["results"]["tokendrop_synth"]
    logged = [json.loads(line) for line in next((tmp_path / "out").rglob("*_samples_tokendrop_synth.jsonl")).read_text().splitlines()]
    answers = [r["filtered_resps"][0] if isinstance(r["filtered_resps"], list) else r["filtered_resps"]
               for r in sorted(logged, key=lambda r: r["doc_id"])]

    assert main(["eval", "--data", str(data), "--method", "hired", "--budget", "0.2", "--max-new-tokens", "8",
                 "--metrics", "exact_match,vqa_accuracy", "--no-progress", "--json", str(tmp_path / "td.jsonl")]) == 0
    ours = json.loads((tmp_path / "td.jsonl").read_text())
    assert answers == [p["prediction"] for p in ours["predictions"]]
    assert results["exact_match,none"] == pytest.approx(ours["metrics"]["exact_match"])
    assert results["vqa_accuracy,none"] == pytest.approx(ours["metrics"]["vqa_accuracy"])
