"""Opening images: one rule for every source (the dataset folder, `datasets` rows and path columns,
`run --image`): decoded in full when checked, EXIF orientation applied, 16-bit scaled, RGB."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from sample_inputs import random_image

from tokendrop.cli import main
from tokendrop.data import load_dataset

ROTATE_90 = 6  # EXIF Orientation: the stored pixels are shown rotated 90 degrees clockwise


def _jpeg(path, size=(240, 180)):
    random_image(size[1], size[0], seed=1).save(path, quality=95)
    return path


def _folder(root, names):
    """A dataset folder with one question per image in root/images/."""
    lines = [json.dumps({"id": f"q{i}", "image": f"images/{n}", "question": "What?", "answers": ["x"]})
             for i, n in enumerate(names)]
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _rotated(path):
    """A 20x10 image whose EXIF says: show it rotated (displayed 10x20)."""
    exif = Image.Exif()
    exif[0x0112] = ROTATE_90
    image = Image.fromarray(np.arange(200, dtype=np.uint8).reshape(10, 20)).convert("RGB")
    image.save(path, format="JPEG", exif=exif)
    return path


def _sixteen_bit(path, value=32896):
    Image.fromarray(np.full((12, 16), value, dtype=np.uint16)).save(path)  # mode I;16
    return path


# ---- row 6: a truncated or oversized file is refused up front, naming the file --------------------
def test_truncated_jpeg_fails_the_folder_check_naming_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    full = _jpeg(tmp_path / "full.jpg").read_bytes()
    _jpeg(tmp_path / "images" / "a.jpg")
    (tmp_path / "images" / "b.jpg").write_bytes(full[:2000])  # `head -c 2000 full.jpg > b.jpg`
    with pytest.raises(ValueError, match=r"questions\.jsonl:2: image .*b\.jpg cannot be read \(.*truncated"):
        load_dataset(_folder(tmp_path, ["a.jpg", "b.jpg"]))


def test_decompression_bomb_fails_the_folder_check_naming_the_file(tmp_path, monkeypatch):
    # PIL refuses images over 2 * MAX_IMAGE_PIXELS (178 MP by default); a lower limit makes the bomb small
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    (tmp_path / "images").mkdir()
    Image.new("L", (30, 20)).save(tmp_path / "images" / "huge.png")
    with pytest.raises(ValueError, match=r"questions\.jsonl:1: image .*huge\.png cannot be read \(.*pixels"):
        load_dataset(_folder(tmp_path, ["huge.png"]))


def test_eval_on_a_folder_with_a_truncated_image_is_one_line_exit_2(tiny_folder, tmp_path, capsys, monkeypatch):
    import tokendrop.cli.eval as eval_cli

    monkeypatch.setattr(eval_cli, "load_model_flag", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _jpeg(tmp_path / "images" / name)
    (tmp_path / "images" / "c.jpg").write_bytes((tmp_path / "images" / "a.jpg").read_bytes()[:2000])
    args = ["eval", "--data", str(_folder(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])), "--model", str(tiny_folder[0]),
            "--method", "none", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "questions.jsonl:3" in err and "c.jpg" in err and "Traceback" not in err


def test_open_image_names_the_file_and_the_reason(tmp_path, monkeypatch):
    from tokendrop.data.images import ImageLoadError, check_image, open_image

    with pytest.raises(ImageLoadError, match=r"cannot read image .*nope\.png \(.*No such file"):
        open_image(tmp_path / "nope.png")
    (tmp_path / "t.jpg").write_bytes(_jpeg(tmp_path / "full.jpg").read_bytes()[:2000])
    with pytest.raises(ImageLoadError, match=r"t\.jpg \(.*truncated"):
        check_image(tmp_path / "t.jpg")
    with pytest.raises(ImageLoadError, match=r"not an image"):
        open_image(io.BytesIO(b"plain text, not an image"), name="row 3")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("L", (30, 20)).save(tmp_path / "huge.png")
    lifted = r"huge\.png \(Image size \(600 pixels\) exceeds limit of 200 pixels: Pillow's decompression"
    with pytest.raises(ImageLoadError, match=lifted):
        open_image(tmp_path / "huge.png")


def test_run_with_a_decompression_bomb_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    # `Image.new('L', (15000, 13000)).save('huge.png'); tokendrop run --image huge.png` (limit lowered: same check)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("L", (30, 20)).save(tmp_path / "huge.png")
    assert main(["run", "--image", str(tmp_path / "huge.png"), "--model", "tiny", "--method", "none"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--image" in err and "huge.png" in err


# ---- row 15: one rule for every source ---------------------------------------------------------
def test_exif_orientation_is_applied_as_datasets_does():
    from tokendrop.data.images import open_image, to_rgb

    path = io.BytesIO()
    _rotated(path)
    image = open_image(io.BytesIO(path.getvalue()))
    assert image.size == (10, 20) and image.mode == "RGB"
    assert to_rgb(image).tobytes() == image.tobytes()  # applying the rule twice changes nothing


def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path):
    from tokendrop.data.images import open_image

    image = open_image(_sixteen_bit(tmp_path / "a.png"))  # 32896 / 65535 of full scale = 128 / 255
    assert image.mode == "RGB" and set(np.asarray(image).ravel().tolist()) == {128}
    assert np.asarray(open_image(_sixteen_bit(tmp_path / "b.png", 65535))).min() == 255
    assert np.asarray(open_image(_sixteen_bit(tmp_path / "c.png", 0))).max() == 0


def test_every_source_reads_the_same_pixels(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` extra is not installed")
    from tokendrop.data.sources import load_samples

    (tmp_path / "images").mkdir()
    _rotated(tmp_path / "images" / "r.jpg")
    _sixteen_bit(tmp_path / "images" / "g.png")
    folder = load_dataset(_folder(tmp_path, ["r.jpg", "g.png"]))
    rows = [{"image": f"images/{n}", "question": "What?", "answers": ["x"]} for n in ("r.jpg", "g.png")]
    (tmp_path / "paths.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = load_samples(tmp_path / "paths.jsonl")  # a path column
    typed = datasets.Dataset.from_list([{**r, "image": str(tmp_path / r["image"])} for r in rows])
    typed.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "typed"))
    images = load_samples(tmp_path / "typed")  # a `datasets.Image` column, bytes embedded
    with Image.open(tmp_path / "images" / "r.jpg") as stored:  # EXIF 6: shown rotated 90 degrees clockwise
        expected = [stored.convert("RGB").transpose(Image.Transpose.ROTATE_270), Image.new("RGB", (16, 12), (128,) * 3)]
    for source in (folder, paths, images):
        assert [s.load_image().tobytes() for s in source] == [e.tobytes() for e in expected]
