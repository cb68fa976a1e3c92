"""Synthetic VQA generator (determinism, balance, geometry) and the dataset-folder loader."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tokendrop.data import load_dataset
from tokendrop.data.synth import COLORS, GLYPHS, GRIDS, QUESTION_TYPES, TILE, generate_dataset, make_sample


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    generate_dataset(tmp_path / "a", 6, seed=5)
    generate_dataset(tmp_path / "b", 6, seed=5)
    generate_dataset(tmp_path / "c", 6, seed=6)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b  # questions.jsonl and every PNG byte-identical
    assert a["questions.jsonl"] != c["questions.jsonl"]
    assert a["images/s5-000000.png"] != c["images/s6-000000.png"]


def test_answers_are_balanced_per_type():
    records = [make_sample(11, i)[1] for i in range(64)]  # 16 per type
    by_type = {t: Counter(r["answer"] for r in records if r["type"] == t) for t in QUESTION_TYPES}
    assert all(sum(c.values()) == 16 for c in by_type.values())
    assert by_type["exists"] == Counter({"yes": 8, "no": 8})
    assert by_type["glyph"] == Counter({g: 2 for g in GLYPHS})
    for qtype in ("color", "count"):
        counts = by_type[qtype].values()
        assert max(counts) - min(counts) <= 1, (qtype, by_type[qtype])
    assert set(by_type["color"]) <= set(COLORS)


def test_answers_follow_from_the_scene():
    for index in range(24):
        _, r = make_sample(3, index)
        objects = r["objects"]
        assert sum(1 for o in objects if o["glyph"]) == 1  # exactly one glyph per scene
        words = r["question"].rstrip("?").split()
        if r["type"] == "count":
            shape = words[2][:-1]  # "How many circles are there"
            assert str(sum(o["shape"] == shape for o in objects)) == r["answer"]
        elif r["type"] == "exists":
            color, shape = words[-2], words[-1]
            present = any((o["color"], o["shape"]) == (color, shape) for o in objects)
            assert r["answer"] == ("yes" if present else "no")
        elif r["type"] == "color":
            shape = words[-1]
            assert [o["color"] for o in objects if o["shape"] == shape] == [r["answer"]]
        else:
            color, shape = words[-2], words[-1]
            assert [o["glyph"] for o in objects if (o["color"], o["shape"]) == (color, shape)] == [r["answer"]]


# The five standard LLaVA-NeXT pinpoints ([height, width]) at TILE-pixel tiles, as in the bundled model's config.
PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]]


def test_image_sizes_select_the_intended_anyres_grid():
    from transformers.image_processing_utils import select_best_resolution

    seen = set()
    for index in range(30):
        image, r = make_sample(7, index)
        best = select_best_resolution((image.height, image.width), PINPOINTS)
        assert [best[0] // TILE, best[1] // TILE] == r["grid"], (image.size, r["grid"])
        seen.add(tuple(r["grid"]))
    assert seen == set(GRIDS)


# ----------------------------------------------------------------------------- loader


def _write(folder, lines, images=("a.png",)):
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.new("RGB", (8, 8)).save(folder / "images" / name)
    (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


GOOD = json.dumps({"id": "q1", "image": "images/a.png", "question": "What?", "answers": ["x", "y", "x"]})


def test_loader_reads_good_lines_and_fills_defaults(tmp_path):
    line2 = json.dumps({"image": "images/a.png", "question": "Why?", "answers": "z", "extra": 1})
    samples = load_dataset(_write(tmp_path, [GOOD, "", line2]))
    assert [s.id for s in samples] == ["q1", "3"]  # no id: the line number
    assert samples[0].answer == "x" and samples[0].type is None
    assert samples[1].answers == ["z"] and samples[1].meta == {"extra": 1}
    assert samples[0].load_image().size == (8, 8)


def test_loader_round_trips_generated_data(tmp_path):
    generate_dataset(tmp_path, 4, seed=1)
    samples = load_dataset(tmp_path)
    assert len(samples) == 4 and samples[0].type == "glyph" and "objects" in samples[0].meta


def test_loader_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        load_dataset(tmp_path / "nope")


def test_loader_missing_questions_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="questions.jsonl"):
        load_dataset(tmp_path)


def test_loader_malformed_line_names_file_and_line(tmp_path):
    _write(tmp_path, [GOOD, '{"image": "images/a.png", "question": '])
    with pytest.raises(ValueError, match=r"questions\.jsonl:2: malformed JSON"):
        load_dataset(tmp_path)


def test_loader_missing_field_names_the_field(tmp_path):
    _write(tmp_path, [json.dumps({"image": "images/a.png", "question": "What?"})])
    with pytest.raises(ValueError, match=r"questions\.jsonl:1: missing required field 'answers'"):
        load_dataset(tmp_path)


def test_loader_missing_image(tmp_path):
    _write(tmp_path, [GOOD.replace("a.png", "b.png")])
    with pytest.raises(FileNotFoundError, match=r"questions\.jsonl:1: image not found"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("image", ["/etc/hostname", "../outside.png", "images/../../outside.png"])
def test_loader_refuses_image_paths_outside_the_folder(tmp_path, image):
    from PIL import Image

    folder = tmp_path / "data"
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    _write(folder, [json.dumps({"image": image, "question": "What?", "answers": ["x"]})])
    with pytest.raises(ValueError, match=r"questions\.jsonl:1: field 'image' must be a path inside the dataset folder"):
        load_dataset(folder)


def test_loader_duplicate_id(tmp_path):
    _write(tmp_path, [GOOD, GOOD])
    with pytest.raises(ValueError, match=r":2: duplicate id 'q1' \(first on line 1\)"):
        load_dataset(tmp_path)


def test_cli_data_writes_and_refuses_to_overwrite(tmp_path, capsys):
    from tokendrop.cli import main

    out = tmp_path / "d"
    assert main(["data", "--out", str(out), "--n", "4", "--seed", "2"]) == 0
    assert len((out / "questions.jsonl").read_text().splitlines()) == 4
    assert "wrote 4 questions" in capsys.readouterr().out
    assert main(["data", "--out", str(out), "--n", "4"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["data", "--out", str(out), "--n", "0"]) == 2
