"""The recipe owns its command line (issue 26, item 5).

``python -m recipes.default_model train ...`` (from the repository root) defines, checks and runs the
default model's training flags; the wheel (``src/tokendrop``) defines none of them, puts nothing on
``sys.path`` and never imports the recipe, and ``tokendrop train`` only says how to run it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tokendrop
from tokendrop.data import generate_dataset

ROOT = Path(__file__).resolve().parents[2]  # the repository root: `recipes` imports as a package from here
WHEEL = Path(tokendrop.__file__).resolve().parent  # src/tokendrop, what the wheel installs
RECIPE_COMMAND = "python -m recipes.default_model train"


@pytest.fixture
def data(tmp_path):
    (tmp_path / "data").mkdir()
    return str(tmp_path / "data")


def _train(data, out, *flags):
    from recipes.default_model.cli import main

    return main(["train", "--data", data, "--out", out, *flags])


# -- the recipe's command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, named", [
    (("--stage1-steps", "-1"), "--stage1-steps"), (("--stage2-steps", "-3"), "--stage2-steps"),
    (("--val-n", "-1"), "--val-n"), (("--minutes", "0"), "--minutes"), (("--threads", "0"), "--threads"),
    (("--batch", "0"), "--batch"), (("--pdrop", "--drop-share", "0.3"), "--drop-share"),
    (("--val", "/no/such/folder"), "--val"),
])
def test_recipe_cli_refuses_a_bad_flag_in_one_line_before_any_work(data, tmp_path, capsys, flags, named):
    assert _train(data, str(tmp_path / "m"), *flags) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and named in err and err.startswith(f"{RECIPE_COMMAND}: error: ")
    assert out == "" and not (tmp_path / "m").exists()  # no "training:" log line, nothing written


def test_recipe_cli_refuses_a_missing_data_folder(tmp_path, capsys):
    assert _train(str(tmp_path / "none"), str(tmp_path / "m")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err and "tokendrop data --out" in err


@pytest.mark.parametrize("argv, named", [(["train", "--data", "d", "--out", "o", "--bogus"], "--bogus"),
                                         (["train", "--data", "d"], "--out"),
                                         (["train", "--data", "d", "--out", "o", "--lr", "fast"], "--lr"),
                                         (["train", "--data", "d", "--out", "o", "--tally-mark", "all"], "--tally-mark"),
                                         ([], "COMMAND")])
def test_recipe_cli_parse_errors_exit_2_naming_the_flag(capsys, argv, named):
    from recipes.default_model.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: the usage, then one error line
    assert last.startswith("python -m recipes.default_model") and named in last


def test_recipe_cli_defaults_are_the_recipe_of_docs(data):
    from recipes.default_model.cli import build_parser, config_from_args
    from recipes.default_model.config import TrainConfig
    from recipes.default_model.model import ModelConfig

    args = build_parser().parse_args(["train", "--data", data, "--out", "o"])
    cfg = config_from_args(args)
    # The flags' defaults: the shipped run (docs/training_recipe.md) and TrainConfig's own defaults agree.
    expected = TrainConfig(train_dir=data, out_dir="o")
    assert cfg == expected and cfg.model == ModelConfig()
    assert (args.stage1_steps, args.stage2_steps, args.batch, args.lr, args.val_n, args.threads) == (850, 2650, 8, 1e-3, 200, 2)
    pdrop = config_from_args(build_parser().parse_args(["train", "--data", data, "--out", "o", "--pdrop", "--tiny"]))
    assert pdrop.pdrop and pdrop.drop_share == 0.0  # --drop-share's default is 0 with --pdrop
    assert pdrop.model.t_layers == 2 and pdrop.ground_layer == 1  # --tiny: the grounded layer fits its 2 layers


def test_python_m_recipe_runs_from_the_repository_root(tmp_path):
    def recipe(*argv):
        return subprocess.run([sys.executable, "-m", "recipes.default_model", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    help_ = recipe("train", "--help")
    assert help_.returncode == 0, help_.stderr
    assert all(flag in help_.stdout for flag in ("--data", "--out", "--stage1-steps", "--pdrop", "--tiny", "--match-init"))
    refused = recipe("train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--data" in refused.stderr


def test_recipe_cli_trains_and_validates_a_tiny_model(tmp_path, capsys):
    generate_dataset(tmp_path / "data", 6, seed=0)
    generate_dataset(tmp_path / "val", 2, seed=1)
    code = _train(str(tmp_path / "data"), str(tmp_path / "m"), "--tiny", "--stage1-steps", "1", "--stage2-steps", "2",
                  "--batch", "2", "--threads", "1", "--val", str(tmp_path / "val"), "--val-n", "2")
    assert code == 0
    out = capsys.readouterr().out
    assert "training: train --data" in out  # the command line, first
    assert (tmp_path / "m" / "config.json").is_file()
    report = json.loads((tmp_path / "m" / "val_report.json").read_text())
    assert set(report) == {"none", "base-only", "train_seconds"} and report["none"]["n"] == 2


# -- the wheel ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [[], ["--data", "d", "--out", "o"], ["--data", "d", "--out", "o", "--tiny", "--pdrop"],
                                  ["--bogus"], ["anything"]])
def test_tokendrop_train_points_to_the_recipe_whatever_its_arguments(capsys, argv):
    from tokendrop.cli import main

    assert main(["train", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("tokendrop train: error: ") and RECIPE_COMMAND in err and "docs/training_recipe.md" in err


@pytest.mark.parametrize("help_flag", ["--help", "-h"])
def test_tokendrop_train_help_says_the_same(capsys, help_flag):
    from tokendrop.cli import main

    assert main(["train", help_flag]) == 0
    assert RECIPE_COMMAND in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("train ")]
    assert len(listed) == 1 and "recipes.default_model" in listed[0]


def test_tokendrop_train_defines_no_recipe_flag():
    from tokendrop.cli import build_parser

    (subcommands,) = [a for a in build_parser()._actions if a.dest == "command"]
    train = subcommands.choices["train"]
    assert [a.option_strings for a in train._actions if a.option_strings] == []  # no --data, --out, --stage1-steps ...


def _wheel_sources():
    files = sorted(WHEEL.rglob("*.py"))
    assert len(files) > 20, WHEEL  # the whole package, not an empty folder
    return [(f.relative_to(WHEEL.parent), f.read_text()) for f in files]


def test_no_module_of_the_wheel_changes_sys_path():
    changes = re.compile(r"sys\.path\s*\.\s*(insert|append|extend)\b|sys\.path\s*(\+=|\[[^\]]*\]\s*=)|"
                         r"sys\.path\s*=|site\.addsitedir")
    found = [f"{name}:{text[:m.start()].count(chr(10)) + 1}" for name, text in _wheel_sources()
             for m in changes.finditer(text)]
    assert found == []


def test_no_module_of_the_wheel_imports_the_recipe(tmp_path):
    imports = re.compile(r"^\s*(from|import)\s+recipes\b|import_module\(\s*f?[\"']recipes|__import__\(\s*[\"']recipes",
                         re.MULTILINE)
    assert [str(name) for name, text in _wheel_sources() if imports.search(text)] == []
    # and at run time: `tokendrop train` with the recipe's flags, run outside the clone, imports nothing of it
    code = ("import sys; from tokendrop.cli import main; main(['train', '--data', '.', '--out', 'm']); "
            "print([m for m in sys.modules if m.split('.')[0] == 'recipes'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
