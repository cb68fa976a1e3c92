"""Hugging Face `datasets` sources: the same samples as the tokendrop folder they were made from."""

from __future__ import annotations

import json
import sys

import pytest

from tokendrop.cli import main
from tokendrop.data import load_dataset
from tokendrop.data.hf import parse_columns
from tokendrop.data.sources import load_samples


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tokendrop.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("data")
    generate_dataset(root, n=5, seed=3)
    return root


@pytest.fixture(scope="module")
def rows(folder):
    return [json.loads(line) for line in (folder / "questions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hf_dataset(folder, rows):
    """The folder as a `datasets.Dataset` with an Image column, as on the hub."""
    datasets = pytest.importorskip("datasets", reason="the `datasets` extra is not installed")
    records = [{"image": str(folder / r["image"]), "question": r["question"], "answers": r["answers"], "type": r["type"],
                "id": r["id"]} for r in rows]
    return datasets.Dataset.from_list(records).cast_column("image", datasets.Image())


def _same_samples(a, b):
    assert [(s.id, s.question, s.answers, s.answer, s.type) for s in a] == [(s.id, s.question, s.answers, s.answer, s.type) for s in b]
    for x, y in zip(a, b):
        assert x.load_image().tobytes() == y.load_image().tobytes()


def test_save_to_disk_and_parquet_read_like_the_folder(folder, hf_dataset, tmp_path):
    hf_dataset.save_to_disk(str(tmp_path / "saved"))
    hf_dataset.to_parquet(str(tmp_path / "data.parquet"))
    reference = load_dataset(folder)
    _same_samples(load_samples(tmp_path / "saved"), reference)
    _same_samples(load_samples(tmp_path / "data.parquet"), reference)
    assert len(load_samples(tmp_path / "data.parquet", limit=2)) == 2


def test_json_lines_with_a_column_mapping_and_relative_image_paths(folder, rows, hf_dataset):
    path = folder / "renamed.jsonl"  # images/... are relative to the file's folder
    path.write_text("".join(json.dumps({"img": r["image"], "q": r["question"], "answers": r["answers"],
                                        "question_type": r["type"], "question_id": r["id"]}) + "\n" for r in rows))
    columns = parse_columns("image=img,question=q,type=question_type,id=question_id")
    _same_samples(load_samples(path, columns), load_dataset(folder))


def test_answers_as_a_string_or_vqav2_records(hf_dataset, tmp_path):
    data = hf_dataset.map(lambda r: {"answer_text": r["answers"][0],
                                     "vqa": [{"answer": a, "answer_id": i} for i, a in enumerate(r["answers"])]})
    data.save_to_disk(str(tmp_path / "d"))
    assert load_samples(tmp_path / "d", {"answers": "answer_text"})[0].answers == [data[0]["answer_text"]]
    assert load_samples(tmp_path / "d", {"answers": "vqa"})[0].answers == data[0]["answers"]


def test_errors_name_the_column_the_split_and_the_row(hf_dataset, tmp_path):
    import datasets

    hf_dataset.save_to_disk(str(tmp_path / "one"))
    with pytest.raises(ValueError, match=r"no column 'q' for field 'question'; columns: image, question"):
        load_samples(tmp_path / "one", {"question": "q"})
    with pytest.raises(ValueError, match=r"no column 'answers' for field 'answers' \(map another with --columns"):
        hf_dataset.remove_columns("answers").save_to_disk(str(tmp_path / "no_answers"))
        load_samples(tmp_path / "no_answers")
    with pytest.raises(ValueError, match="row 1: duplicate id"):
        hf_dataset.map(lambda r: {"id": "same"}).save_to_disk(str(tmp_path / "dup"))
        load_samples(tmp_path / "dup")
    datasets.DatasetDict(validation=hf_dataset, test=hf_dataset).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match="has splits validation, test: choose one"):
        load_samples(tmp_path / "two")
    assert len(load_samples(tmp_path / "two", split="test")) == len(hf_dataset)
    with pytest.raises(ValueError, match="column 'question' must hold a non-empty string"):
        hf_dataset.map(lambda r: {"question": " "}).save_to_disk(str(tmp_path / "blank"))
        load_samples(tmp_path / "blank")


def test_parse_columns():
    assert parse_columns("image=img, answers=answer") == {"image": "img", "answers": "answer"}
    assert parse_columns(None) == {}
    with pytest.raises(ValueError, match="unknown field 'picture'"):
        parse_columns("picture=img")
    with pytest.raises(ValueError, match="field=column pairs"):
        parse_columns("image")


def test_eval_on_parquet_equals_eval_on_the_folder(tiny_folder, folder, hf_dataset, tmp_path):
    model, _ = tiny_folder
    hf_dataset.to_parquet(str(tmp_path / "data.parquet"))
    args = ["--model", str(model), "--method", "none", "--max-new-tokens", "2", "--no-progress"]
    assert main(["eval", "--data", str(folder), *args, "--json", str(tmp_path / "a.jsonl")]) == 0
    assert main(["eval", "--data", str(tmp_path / "data.parquet"), *args, "--json", str(tmp_path / "b.jsonl")]) == 0
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("a.jsonl", "b.jsonl"))
    assert a["predictions"] == b["predictions"] and a["metrics"] == b["metrics"]


def test_without_datasets_the_error_says_how_to_install(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    (tmp_path / "data.parquet").write_bytes(b"")
    assert main(["eval", "--data", str(tmp_path / "data.parquet"), "--model", "tiny"]) == 2
    assert 'needs the Hugging Face `datasets` package: pip install "tokendrop[datasets]"' in capsys.readouterr().err
    assert main(["eval", "--data", "no/such_data", "--model", "tiny"]) == 2
    assert "no/such_data: no such folder or file" in capsys.readouterr().err
    assert len(load_samples(folder)) == 5  # the folder format needs no `datasets`
    with pytest.raises(ValueError, match="column mappings and splits are for Hugging Face"):
        load_samples(folder, {"id": "question_id"})
