"""`tokendrop eval` on a tiny random model and a small generated dataset: records, table, plot, errors."""

from __future__ import annotations

import json

import pytest

from tokendrop.cli import main
from tokendrop.evaluation.harness import Config, grid, markdown_table


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tokendrop.data.synth import generate_dataset

    folder = tmp_path_factory.mktemp("data")
    generate_dataset(folder, n=6, seed=3)
    return folder


def test_grid_expands_budgets_only_for_pre_llm_methods():
    assert grid(["none", "hired", "pdrop"], [0.1, 0.2]) == [Config("none"), Config("hired", 0.1), Config("hired", 0.2),
                                                              Config("pdrop")]
    with pytest.raises(ValueError, match="at least one method"):
        grid([], [0.1])


def test_eval_writes_json_markdown_and_plot(tiny_folder, dataset, tmp_path, capsys):
    folder, _ = tiny_folder
    out = tmp_path / "r.json"
    code = main(["eval", "--data", str(dataset), "--model", str(folder), "--method", "none,hired,random+fastv",
                 "--budget", "0.2,0.4", "--batch-size", "3", "--max-new-tokens", "2", "--json", str(out),
                 "--markdown", str(tmp_path / "t.md"), "--plot", str(tmp_path / "p.png"), "--no-progress"])
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]  # JSON lines, one per configuration
    assert [r["label"] for r in records] == ["none", "hired@0.2", "hired@0.4", "random+fastv@0.2", "random+fastv@0.4"]
    for r in records:
        assert r["n"] == 6 and len(r["predictions"]) == 6
        assert set(r["metrics"]) == {"exact_match", "vqa_accuracy", "anls", "relaxed_accuracy"}
        assert all(0.0 <= v <= 1.0 for v in r["metrics"].values())
    assert records[1]["visual_tokens"] < records[2]["visual_tokens"] < records[0]["visual_tokens"]
    assert records[0]["equivalent_tokens"] is None and records[3]["equivalent_tokens"] < records[3]["visual_tokens"]
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "| hired | 0.2 |" in (tmp_path / "t.md").read_text()


def test_markdown_table_per_type():
    record = {"method": "hired", "budget": 0.2, "visual_tokens": 64.0, "equivalent_tokens": None,
              "metrics": {"exact_match": 0.5}, "by_type": {"color": {"exact_match": 1.0}, "glyph": {"exact_match": 0.0}}}
    assert markdown_table([record]).splitlines()[-1] == "| hired | 0.2 | 64.0 |  | 50.0 | 100.0 | 0.0 |"


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--metrics", "exact"], "unknown metric 'exact'"),
    (["--budget", "0.1,x"], "--budget must be comma-separated numbers"),
    (["--method", "hired", "--budget", "2"], "budget must be in (0, 1]"),
])
def test_eval_bad_arguments_exit_2(tiny_folder, dataset, capsys, argv, message):
    folder, _ = tiny_folder
    args = ["eval", "--data", str(dataset), "--model", str(folder), "--limit", "1", "--no-progress"]
    assert main(args + argv) == 2
    assert message in capsys.readouterr().err


def test_evaluate_pads_on_the_left_whatever_the_processor_says(tiny_folder, dataset, monkeypatch):
    # Batched greedy generation must continue each row from its own last token: with right padding
    # the short rows would generate after their pad tokens.
    from tokendrop.data import load_dataset
    from tokendrop.evaluation.harness import evaluate
    from tokendrop.loading import load_model

    folder, _ = tiny_folder
    model, processor = load_model(str(folder))
    processor.tokenizer.padding_side = "right"
    samples = load_dataset(dataset)[:3]
    assert len({s.load_image().size for s in samples}) > 1  # different prompt lengths: padding needed
    last_columns = []
    generate = model.generate

    def spy(**inputs):
        last_columns.append(inputs["attention_mask"][:, -1].tolist())
        return generate(**inputs)

    monkeypatch.setattr(model, "generate", spy)
    evaluate(model, processor, samples, [Config("none")], batch_size=3, max_new_tokens=2, progress=False)
    assert last_columns == [[1, 1, 1]]  # every row ends with a real token
    assert processor.tokenizer.padding_side == "right"  # restored
