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


# ---- every row's image is checked before the model loads (issue 25 row 5) ---------------------------
def _bad_third_row(folder, rows, tmp_path, kind):
    """A JSONL source whose third row (row 2) names a bad image: missing, null, not an image, truncated."""
    import shutil

    shutil.copytree(folder / "images", tmp_path / "images")
    good = (tmp_path / rows[0]["image"]).read_bytes()
    (tmp_path / "images" / "text.png").write_text("not an image")
    (tmp_path / "images" / "cut.png").write_bytes(good[:len(good) // 2])
    bad = {"missing": "images/nope.png", "null": None, "corrupt": "images/text.png", "truncated": "images/cut.png"}[kind]
    records = [{"image": r["image"], "question": r["question"], "answers": r["answers"]} for r in rows]
    records[2]["image"] = bad
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("kind", ["missing", "null", "corrupt", "truncated"])
def test_a_bad_image_in_a_later_row_is_named_before_any_work(folder, rows, tmp_path, kind):
    pytest.importorskip("datasets", reason="the `datasets` extra is not installed")
    path = _bad_third_row(folder, rows, tmp_path, kind)
    with pytest.raises(ValueError, match=rf"bad\.jsonl: row 2: column 'image': "):
        load_samples(path)
    assert len(load_samples(path, limit=2)) == 2  # rows 0 and 1 are fine


def test_a_bad_image_in_an_image_column_is_named(hf_dataset, tmp_path):
    import datasets

    data = hf_dataset.cast_column("image", datasets.Image(decode=False))
    data = data.map(lambda r, i: {"image": {"bytes": b"junk", "path": None} if i == 3 else r["image"]}, with_indices=True)
    data.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"saved: row 3: column 'image': cannot read image .*not an image"):
        load_samples(tmp_path / "saved")


def test_eval_with_a_missing_image_in_row_2_is_one_line_exit_2(tiny_folder, folder, rows, tmp_path, capsys,
                                                                 monkeypatch):
    # `tokendrop eval --data bad.jsonl --method none --batch-size 2`: refused before the model loads
    pytest.importorskip("datasets", reason="the `datasets` extra is not installed")
    import tokendrop.cli.eval as eval_cli

    monkeypatch.setattr(eval_cli, "load_model_flag", lambda *a, **k: pytest.fail("the model was loaded"))
    path = _bad_third_row(folder, rows, tmp_path, "missing")
    args = ["eval", "--data", str(path), "--model", str(tiny_folder[0]), "--method", "none", "--batch-size", "2",
            "--no-progress", "--json", str(tmp_path / "r.jsonl")]
    assert main(args) == 2
    err = capsys.readouterr().err  # also holds `datasets`' own progress lines
    errors = [line for line in err.splitlines() if line.startswith("tokendrop eval: error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    assert f"--data: {path}: row 2: column 'image': cannot read image " in errors[0] and "nope.png" in errors[0]
    assert not (tmp_path / "r.jsonl").exists()
