"""Specifications of harness/sweep.py: the budgets, the lr choice, and the RL-vs-SFT sweep end to
end on a tiny model (every point run, then resumed from its results)."""
import json

import pytest

from harness import rl_vs_sft, sweep
from harness.tests.fixtures import cli


def test_budget_flags_and_lr_choice():
    assert sweep.budget_flags("13") == ["--params", "13"]
    assert sweep.budget_flags("xs8") == ["--lora-xs", "--r", "8", "--u", "64", "--n-tie", "1"]
    for bad in ("0", "xs", "x2", "13.5", "-1"):
        with pytest.raises(ValueError, match="unknown budget"):
            sweep.budget_flags(bad)
    done = {(f"rl-13-lr{lr:g}-s0", "val"): dict(strict=dict(acc=a))
            for lr, a in [(0.01, 0.4), (0.03, 0.5), (0.1, 0.5)]}
    done[("rl-13-lr0.03-s1", "test")] = dict(seed=1)
    assert rl_vs_sft.chosen(done, "13", "rl", [0.1, 0.03, 0.01]) == (0.03, {1: dict(seed=1)})


@pytest.mark.slow
def test_sweep_smoke_on_a_tiny_model_runs_every_point_and_resumes(
        answer_folder, sevens_jsonl, tmp_path):
    out = tmp_path / "sweep"
    argv = ["--model", answer_folder, "--data", sevens_jsonl, "--backend", "hf", "--budgets",
            "1,xs1", "--lrs", "0.01,0.1", "--extra-seeds-for", "1", "--val", "2", "--eval-limit",
            "0", "--out", str(out), "--batch-prompts", "2", "--group-size", "4",
            "--max-new-tokens", "6", "--steps", "2", "--mini-batches", "1", "--reward", "strict"]
    p = cli("harness.sweep", *argv, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in open(out / "results.jsonl")]
    names = {(r["name"], r["split"]) for r in rows}
    for m in ("rl", "sft"):
        # LoRA-XS r = 1 untied: one scalar per module (2 layers × 7)
        for b, params in (("1", 1), ("xs1", 14)):
            assert all((f"{m}-{b}-lr{lr:g}-s0", "val") in names for lr in (0.01, 0.1))
            lr = rl_vs_sft.chosen({(r["name"], r["split"]): r for r in rows}, b, m, [0.01, 0.1])[0]
            test = [r for r in rows if (r["split"], r["method"], r["budget"]) == ("test", m, b)]
            assert sorted(r["seed"] for r in test) == ([0, 1] if b == "1" else [0])
            assert {r["lr"] for r in test} == {lr}
            assert test[0]["params"] == params and len(test[0]["verdicts"]) == test[0]["n"] == 6
    table = (out / "table.md").read_text()
    assert all(f"\n| {m} {b} |" in table for m in ("RL", "SFT") for b in ("1", "xs1"))
    assert "\n| 1 | 1 |" in table and "\n| xs1 | 14 |" in table  # RL against SFT per budget
    assert (out / "accuracy.png").stat().st_size > 1000
    # a second run finds every evaluation on file and trains nothing
    p = cli("harness.sweep", *argv, timeout=900)
    assert p.returncode == 0 and [json.loads(x) for x in open(out / "results.jsonl")] == rows
    assert "grpo" not in p.stderr and "sft:" not in p.stderr
