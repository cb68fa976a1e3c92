"""`tokendrop show` and `tokendrop.viz`: picture size, geometry against the processor, and errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("matplotlib")

import tokendrop as td  # noqa: E402
from tokendrop import viz  # noqa: E402
from tokendrop.registry import family_for as adapter_for  # noqa: E402
from tokendrop.cli import main  # noqa: E402
from tokendrop.loading import format_prompt  # noqa: E402
from tokendrop.cli import options  # noqa: E402
from tokendrop.cli import show as show_cli  # noqa: E402
from tokendrop.methods.layout import Layout  # noqa: E402

from sample_inputs import random_image  # noqa: E402

TILE = 112  # tiny model's tile pixels (8x8 patches of 14 px)


@pytest.fixture
def tiny_cli(monkeypatch, next_model):
    """Make `--model` load the session's tiny model instead of building a new one (saves seconds a call)."""
    model, processor = next_model
    monkeypatch.setattr(options, "load_model_flag", lambda spec, **kw: (model, processor, "tiny (test fixture)"))
    return model, processor


@pytest.mark.parametrize("methods", ["hired", "hired,random"])
def test_show_writes_png_of_documented_size(tmp_path, capsys, tiny_cli, methods):
    image = tmp_path / "in.png"
    random_image(150, 300).save(image)  # 1x2 tiles
    out = tmp_path / "kept.png"
    assert main(["show", "--image", str(image), "--method", methods, "--budget", "0.2", "--out", str(out)]) == 0
    rows = len(methods.split(","))
    with Image.open(out) as picture:
        # documented rule: DPI 100, 12.5 in wide, 4.5 in per method -> 1250 x 450*rows
        assert picture.format == "PNG"
        assert picture.size == viz.figure_size(rows) == (1250, 450 * rows)
    printed = capsys.readouterr().out
    # 1x2 tiles: P = 3 partitions of 64 patches; budget 0.2 keeps floor(0.2 * 192) = 38
    assert printed.count("total 38 of 192") == rows


def test_bad_image_path_exits_2_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nowhere.png"
    assert main(["show", "--image", str(missing), "--out", str(tmp_path / "kept.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert not (tmp_path / "kept.png").exists()


def test_not_an_image_exits_2(tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    assert main(["show", "--image", str(bad), "--out", str(tmp_path / "kept.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_unknown_method_suggests_the_close_name(tmp_path, capsys):
    assert main(["show", "--method", "hird", "--out", str(tmp_path / "kept.png")]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'hired'?" in err and "base-only" in err


def test_parse_methods_builds_each_name():
    methods = list(show_cli.parse_methods("hired,hired-official,random,spatial,base-only", 0.3, {"alpha": 0.4}).values())
    assert [type(m) for m in methods] == [td.HiRED, td.HiRED, td.RandomDrop, td.SpatialDrop, td.BaseOnly]
    assert methods[0] == td.HiRED(budget=0.3, alpha=0.4) and methods[1].variant == "official"


@pytest.mark.parametrize("size", [(224, 224), (100, 330), (294, 271)])  # 2x2, 1x3, 2x2 with unpadded columns
def test_canvas_and_base_pixels_match_the_processor(next_model, size):
    model, processor = next_model
    image = random_image(*size, seed=3)
    layout = adapter_for(model).layout(size)
    ip = processor.image_processor
    pixel_values = ip(images=image, return_tensors="pt")["pixel_values"][0, : layout.num_partitions]  # (P, 3, S, S)
    seen = (pixel_values.permute(0, 2, 3, 1).numpy() * np.array(ip.image_std) + np.array(ip.image_mean)) * 255
    rows, cols = layout.tiles
    canvas = seen[1:].reshape(rows, cols, TILE, TILE, 3).transpose(0, 2, 1, 3, 4).reshape(rows * TILE, cols * TILE, 3)
    assert np.abs(canvas - viz.canvas_pixels(image, layout, TILE)).max() < 0.5
    assert np.abs(seen[0] - viz.base_pixels(image, TILE)).max() < 0.5


def test_kept_masks_agree_with_counts_and_stay_in_the_unpadded_region(next_model):
    model, processor = next_model
    image = random_image(294, 271, seed=1)  # 2x2 tiles, one token column unpadded away on each side
    layout = adapter_for(model).layout((image.height, image.width))
    assert layout.crop == (0, 16, 1, 15)
    picture = viz.show_selection(model, processor, image, "what is it?", [td.SpatialDrop(budget=0.25)])
    selection = viz.collect(model, processor, image, "what is it?", [td.SpatialDrop(budget=0.25)])[0][1]
    base, canvas = viz.kept_masks(layout, selection)
    counts = viz.partition_counts(layout, selection)
    assert int(base.sum()) == counts[0] and int(canvas.sum()) == sum(counts[1:])
    assert not (canvas & ~layout.canvas_valid()).any()
    assert picture.size == viz.figure_size(1)


def test_single_partition_layout_draws_only_the_base():
    layout = Layout(grid=8)  # LLaVA-1.5: no tiles
    selection = torch.tensor([[0, 0, 0], [0, 3, 5]])
    fig = viz.draw(random_image(120, 160), layout, [("one", selection)], TILE)
    assert viz.to_image(fig).size == viz.figure_size(1)
    assert viz.count_line(layout, selection) == "base 2 | total 2 of 64"


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        viz.draw(random_image(50, 50), Layout(grid=8), [("x", torch.zeros(0, 3, dtype=torch.long))], TILE)


@pytest.mark.parametrize("size", [(150, 301), (333, 120)])
def test_single_partition_base_pixels_match_the_llava_processor(size):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    ip = LlavaImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE})
    image = random_image(*size, seed=5)
    seen = ip(images=image, return_tensors="pt")["pixel_values"][0].permute(1, 2, 0).numpy()  # (S, S, 3)
    seen = (seen * np.array(ip.image_std) + np.array(ip.image_mean)) * 255
    assert np.abs(seen - viz.base_pixels(image, TILE, squash=False)).max() < 0.5


class _ChatProcessor:
    image_token = "<image>"
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, add_generation_prompt):
        content = messages[0]["content"]
        assert content[0] == {"type": "image"} and add_generation_prompt
        return f"USER: {self.image_token}\n{content[1]['text']} ASSISTANT:"


def test_format_prompt_uses_the_chat_template_or_the_image_token():
    assert format_prompt(_ChatProcessor(), "What is it?") == "USER: <image>\nWhat is it? ASSISTANT:"
    plain = type("Plain", (), {"image_token": "<image>", "chat_template": None})()
    assert format_prompt(plain, "What is it?") == "<image>\nWhat is it?"
    assert format_prompt(plain, "<image>\nQ: what? A:") == "<image>\nQ: what? A:"  # already formatted


def test_show_draws_a_qwen_grid(qwen_folder, tmp_path, capsys):
    folder, image = qwen_folder
    out = tmp_path / "kept.png"
    assert main(["show", "--model", str(folder), "--image", str(image), "--method", "dominant,spatial",
                 "--budget", "0.3", "--out", str(out)]) == 0
    with Image.open(out) as picture:
        assert picture.size == viz.figure_size(2)
    printed = capsys.readouterr().out
    assert "tokens)" in printed and printed.count("kept ") == 2
