"""The checks every subcommand makes before any work (issue 25, rows 7-10 and 17): output paths that
cannot be written, budgets that keep no token, `show`'s and `cost`'s options against the model, and
the budget given as a method option. Each is one line naming the flag, exit 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tokendrop.cli import UsageError, main


def one_line_error(capsys, *needles):
    """The error: one line, the last on stderr (progress bars of the work done before may precede it)."""
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.replace("\r", "\n").splitlines() if ": error: " in line]
    assert "Traceback" not in err and len(errors) == 1 and err.endswith(errors[0]), err
    for needle in needles:
        assert needle in errors[0], err
    return errors[0]


@pytest.fixture
def unwritable(tmp_path):
    """A folder where no file can be created. Root ignores permission bits, so as root: sysfs, which
    refuses new files to everyone."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
    elif Path("/sys/kernel").is_dir():
        yield Path("/sys/kernel")
    else:
        pytest.skip("no folder refuses root here")


needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full (a file whose writes fail)")


# ---- row 7: outputs checked before any work ----------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["env", "--json", "{dir}/r.json"], "--json"),
    (["methods", "--json", "{dir}/r.json"], "--json"),
    (["cost", "--json", "{dir}/r.json"], "--json"),
    (["run", "--json", "{dir}/r.json"], "--json"),
    (["bench", "--json", "{dir}/r.json"], "--json"),
    (["bench", "--plot", "{dir}/b.png"], "--plot"),
    (["show", "--out", "{dir}/k.png"], "--out"),
    (["data", "--out", "{dir}/d", "--n", "2"], "--out"),
    (["eval", "--data", "{data}", "--method", "none,random", "--budget", "0.2", "--json", "{dir}/r.jsonl"], "--json"),
    (["eval", "--data", "{data}", "--markdown", "{dir}/t.md"], "--markdown"),
    (["eval", "--data", "{data}", "--plot", "{dir}/a.png"], "--plot"),
])
def test_an_unwritable_output_is_refused_before_any_work(unwritable, dataset, no_model_loading, capsys, argv, flag):
    argv = [a.format(dir=unwritable, data=dataset) for a in argv]
    assert main(argv) == 2
    one_line_error(capsys, flag, str(unwritable))


def test_an_output_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["env", "--json", str(tmp_path / "file" / "r.json")]) == 2
    one_line_error(capsys, "--json", "is not a folder")
    assert main(["data", "--out", str(tmp_path / "file" / "d"), "--n", "1"]) == 2
    one_line_error(capsys, "--out")


def test_the_probe_leaves_no_trace(tmp_path):
    from tokendrop.cli.options import output_folder, output_path

    new = tmp_path / "new.json"
    assert output_path(str(new), "--json") == new and not new.exists()
    old = tmp_path / "old.json"
    old.write_text("kept")
    stamp = old.stat().st_mtime_ns
    assert output_path(str(old), "--json") == old
    assert old.read_text() == "kept" and old.stat().st_mtime_ns == stamp
    folder = tmp_path / "a" / "b"
    assert output_folder(str(folder), "--out") == folder and folder.is_dir() and not any(folder.iterdir())


@needs_dev_full
@pytest.mark.parametrize("command", [["env"], ["methods"], ["cost", "--method", "none"]])
def test_a_write_that_fails_names_the_file(capsys, command):
    assert main([*command, "--json", "/dev/full"]) == 2
    one_line_error(capsys, "--json /dev/full", "No space left")


@needs_dev_full
def test_run_prints_its_answers_before_a_write_fails(tiny_folder, capsys):
    folder, image = tiny_folder
    code = main(["run", "--model", str(folder), "--image", str(image), "--method", "none", "--max-new-tokens", "1",
                 "--warmup", "0", "--json", "/dev/full"])
    assert code == 2
    captured = capsys.readouterr()
    assert "[none]" in captured.out, "the answers are not lost"
    assert "Traceback" not in captured.err and captured.err.strip().splitlines()[-1].startswith(
        "tokendrop run: error: --json /dev/full: could not write it (No space left on device)")


def test_data_on_a_full_disk_names_the_file_and_keeps_what_it_wrote(tmp_path, monkeypatch, capsys):
    import errno

    from PIL import Image

    real, saved = Image.Image.save, []

    def fill_the_disk(image, path, *args, **kwargs):
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        return real(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fill_the_disk)
    assert main(["data", "--out", str(tmp_path / "d"), "--n", "3"]) == 2
    one_line_error(capsys, "--out", "No space left", "kept")
    assert len((tmp_path / "d" / "questions.jsonl").read_text().splitlines()) == 1  # the finished sample
    assert Path(saved[0]).is_file()


def test_a_write_error_is_a_usage_error_naming_the_file(tmp_path):
    from tokendrop.cli.options import write_output

    with pytest.raises(UsageError, match="--json .*: could not write it .Is a directory"):
        write_output(tmp_path, "{}", "--json")  # a folder: IsADirectoryError at write time


# ---- row 8: a budget that keeps no token -------------------------------------------------------------------
def test_run_with_a_budget_that_keeps_no_token(tiny_folder, capsys):
    folder, image = tiny_folder
    assert main(["run", "--model", str(folder), "--image", str(image), "--method", "hired", "--budget", "0.001"]) == 2
    one_line_error(capsys, "--budget", "keeps no visual token", "smallest budget that keeps one token")


def test_bench_with_a_budget_that_keeps_no_token_stops_before_measuring(tiny_folder, tmp_path, capsys):
    folder, _ = tiny_folder
    out = tmp_path / "b.json"
    assert main(["bench", "--model", str(folder), "--method", "none,hired", "--budget", "0.001", "--no-progress",
                 "--json", str(out)]) == 2
    one_line_error(capsys, "--budget", "keeps no visual token", "smallest budget that keeps one token")
    assert not out.exists()


def test_eval_with_a_budget_that_keeps_no_token_stops_before_evaluating(tiny_folder, dataset, tmp_path, monkeypatch,
                                                                        capsys):
    from tokendrop.evaluation import harness

    def refuse(*args, **kwargs):
        raise AssertionError("evaluation started before the budgets were checked against the images")

    monkeypatch.setattr(harness, "evaluate", refuse)
    folder, _ = tiny_folder
    out = tmp_path / "r.jsonl"
    assert main(["eval", "--data", str(dataset), "--model", str(folder), "--method", "none,hired", "--budget", "0.001",
                 "--no-progress", "--json", str(out)]) == 2
    err = one_line_error(capsys, "--budget", "keeps no visual token", "smallest budget that keeps one token")
    assert "of an image of" in err  # the data's own image size, from the up-front data check
    assert not out.exists()


def test_every_sample_knows_its_image_size_from_the_data_check(dataset, tmp_path):
    from PIL import Image

    from tokendrop.data.sources import load_samples

    samples = load_samples(str(dataset), progress=False)
    assert all(s.image_size == (s.load_image().height, s.load_image().width) for s in samples)
    pytest.importorskip("datasets")
    rows = tmp_path / "rows.jsonl"
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    rows.write_text('{"image": "a.png", "question": "q", "answers": ["a"]}\n')
    (sample,) = load_samples(str(rows), progress=False)
    assert sample.image_size == (30, 40)


def test_check_on_model_counts_the_tokens_of_every_image_size(next_model):
    from tokendrop.cli.options import check_on_model

    model, processor = next_model
    check_on_model(model, processor, ["none", "hired"], [0.2], {}, image_sizes=[(150, 260)])
    with pytest.raises(UsageError, match="--budget: .*keeps no visual token of an image of 150x260"):
        check_on_model(model, processor, ["none", "hired+pdrop"], [0.2, 0.001], {}, image_sizes=[(150, 260)])


# ---- row 9: show checks what run checks ----------------------------------------------------------------------
def test_show_refuses_an_unknown_option_before_loading(tmp_path, no_model_loading, capsys):
    argv = ["show", "--method", "hired", "--budget", "0.2", "--method-args", "foo=1", "--out", str(tmp_path / "k.png")]
    assert main(argv) == 2
    one_line_error(capsys, "--method-args", "'foo' is not an option of hired")
    assert not (tmp_path / "k.png").exists()


@pytest.mark.parametrize("argv, needles", [
    (["--method-args", "final_layer=99"], ["--method hired", "final_layer must be in [-3, 3)"]),
    (["--budget", "0.001"], ["--budget", "smallest budget that keeps one token"]),
])
def test_show_checks_the_methods_against_the_model(tiny_folder, tmp_path, capsys, argv, needles):
    folder, image = tiny_folder
    out = tmp_path / "k.png"
    assert main(["show", "--model", str(folder), "--image", str(image), "--method", "hired", *argv, "--out", str(out)]) == 2
    one_line_error(capsys, *needles)
    assert not out.exists()


def test_show_names_a_method_the_family_cannot_run(qwen_folder, tmp_path, capsys):
    folder, image = qwen_folder
    assert main(["show", "--model", str(folder), "--image", str(image), "--method", "hired",
                 "--out", str(tmp_path / "k.png")]) == 2
    one_line_error(capsys, "--method hired", "HiRED needs", "cls_token")


# ---- row 10: cost validates like apply() -------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["--method", "fastv", "--method-args", "k=99"], ["--method fastv", "k must be in [0, 32)"]),
    (["--method", "pdrop", "--method-args", "layers=[8,99]"], ["--method pdrop", "layers must be strictly increasing"]),
    (["--method", "hired", "--method-args", "final_layer=99"], ["--method hired", "final_layer must be in"]),
    (["--method", "hired", "--budget", "0.0001"], ["--budget", "smallest budget that keeps one token"]),
    (["--arch", "qwen2-vl-7b", "--method", "hired"], ["--method hired", "HiRED needs", "cls_token"]),
    (["--arch", "qwen2-vl-7b", "--method", "dominant", "--method-args", "layer=99"], ["--method dominant", "layer must be in"]),
    (["--arch", "qwen2-vl-7b", "--method", "pdrop", "--method-args", "positions=renumber"], ["--method pdrop", "renumber"]),
    (["--arch", "qwen2-vl-7b", "--method", "none,random", "--image-size", "28x6000"], ["--image-size 28x6000", "aspect ratio"]),
])
def test_cost_refuses_what_apply_refuses(capsys, argv, needles):
    assert main(["cost", *argv]) == 2
    one_line_error(capsys, *needles)


def test_cost_library_checks_like_apply():
    import tokendrop as td
    from tokendrop import cost

    spec = cost.load_arch("qwen2-vl-7b")
    model, images = cost.meta_model(cost.arch_config(spec)), cost.arch_geometry_processor(spec)
    with pytest.raises(ValueError, match="HiRED needs"):  # was silently costed
        cost.method_cost(model, (td.HiRED(budget=0.2),), (672, 672), processor=images)
    with pytest.raises(ValueError, match="keeps no visual token"):
        cost.method_cost(model, (td.RandomDrop(budget=0.001),), (672, 672), processor=images)


# ---- row 17: the budget as a method option --------------------------------------------------------------------
@pytest.mark.parametrize("args", ["budget=0.3", "hired.budget=0.3", "alpha=0.6,budget=0.3"])
def test_the_budget_as_a_method_option_points_to_the_budget_flag(capsys, args):
    assert main(["cost", "--method", "hired", "--method-args", args]) == 2
    one_line_error(capsys, "--method-args", "--budget 0.3")
