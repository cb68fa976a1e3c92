"""`tokendrop eval` under torchrun: 2 processes (gloo on this CPU) give the JSON of 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tokendrop
from tokendrop.cli import main
from tokendrop.evaluation.distributed import Ranks, from_env


def test_shard_and_gather_are_inverse_in_one_process():
    ranks, items = Ranks(), list("abcdefg")
    assert ranks.shard(items) == items and ranks.gather(items) == items


def test_shards_cover_every_item_once():
    items = list(range(7))
    shards = [Ranks(rank, 3).shard(items) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]


def test_ranks_from_the_launcher_variables():
    assert from_env({}) == Ranks(0, 1, 0)
    assert from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == Ranks(1, 2, 1)
    with pytest.raises(ValueError, match="RANK must be in"):
        from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ValueError, match="must be integers"):
        from_env({"WORLD_SIZE": "two"})


def _records(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        del r["seconds"]  # wall time, the one field that differs
    return records


def test_two_processes_equal_one(tmp_path):
    from tokendrop.data.synth import generate_dataset

    generate_dataset(tmp_path / "data", n=7, seed=5)  # 7: the ranks answer 4 and 3 questions
    args = ["eval", "--data", str(tmp_path / "data"), "--method", "none,hired+fastv", "--budget", "0.2",
            "--batch-size", "2", "--max-new-tokens", "3", "--no-progress"]  # the bundled model
    assert main([*args, "--json", str(tmp_path / "one.jsonl")]) == 0
    env = dict(os.environ, PYTHONPATH=str(Path(tokendrop.__file__).parents[1]), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "tokendrop", *args, "--json", str(tmp_path / "two.jsonl")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = _records(tmp_path / "one.jsonl"), _records(tmp_path / "two.jsonl")
    assert [r["label"] for r in two] == ["none", "hired+fastv@0.2"]  # rank 0 wrote each once, rank 1 nothing
    assert two == one  # predictions in question order, metrics, token counts, run settings
    assert run.stdout.count("results:") == 1  # only rank 0 reports
