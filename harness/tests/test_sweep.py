"""SFT (sft.py) against a per-token reference, and the RL-vs-SFT sweep end to end on a tiny
model."""
import json
import subprocess
import sys

import pytest
import torch

import task
import tinylora
from harness import sft, sweep
from harness.tests.fixtures import tiny_model
from harness.tests.test_train_grpo import HERE


def test_demos_are_the_gold_solution_then_eos(smol_tok):
    rows, shots = task.load_task("arith", "train")
    batch = task.prompt_ids(smol_tok, rows[:3], shots, 512)
    seqs = sft.demos(smol_tok, batch, smol_tok.eos_token_id)
    for (row, p), (p2, c) in zip(batch, seqs):
        assert p2 == p and c[-1] == smol_tok.eos_token_id
        assert smol_tok.decode(c[:-1]) == row["solution"]
        assert all(task.reward(smol_tok.decode(c[:-1]), row, True, k) == 1 for k in task.REWARDS)


@pytest.mark.parametrize("micro_batch", [1, 2, 5])
def test_sft_gradient_is_the_mean_token_nll_of_the_solutions(smol_tok, micro_batch):
    """sft_update's loss and v-gradient equal a slow reference: each sequence's full forward, −log π
    of every solution token, averaged over all solution tokens of the batch (not per sequence)."""
    m = tiny_model("qwen2", vocab=len(smol_tok), layers=2)
    bank = tinylora.apply_tinylora(m, params=13)
    with torch.no_grad():
        bank.v.normal_(0, 0.3)
    rows, shots = task.load_task("arith", "train")
    seqs = sft.demos(smol_tok, task.prompt_ids(smol_tok, rows[:5], shots, 512),
                     smol_tok.eos_token_id)
    seqs[1] = (seqs[1][0], seqs[1][1][:3])  # uneven lengths, so a per-sequence mean would differ
    nll, n = 0.0, 0
    for p, c in seqs:
        logits = m(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float()  # (len(c), vocab)
        nll = nll - logits.log_softmax(-1).gather(1, torch.tensor(c)[:, None]).sum()
        n += len(c)
    ref = torch.autograd.grad(nll / n, bank.v)[0]
    opt = torch.optim.AdamW([bank.v], lr=0.0, weight_decay=0.0)
    loss, _ = sft.sft_update(m, bank, opt, seqs, [0.0], micro_batch, grad_clip=1e9)
    assert loss == pytest.approx((nll / n).item(), rel=1e-5)
    assert torch.allclose(bank.v.grad, ref, rtol=1e-4, atol=1e-7), (bank.v.grad, ref)


def test_budget_flags_and_lr_choice():
    assert sweep.budget_flags("13") == ["--params", "13"]
    assert sweep.budget_flags("xs8") == ["--lora-xs", "--r", "8", "--u", "64", "--n-tie", "1"]
    for bad in ("0", "xs", "x2", "13.5", "-1"):
        with pytest.raises(ValueError, match="unknown budget"):
            sweep.budget_flags(bad)
    done = {(f"rl-13-lr{lr:g}-s0", "val"): dict(strict=dict(acc=a)) for lr,
            a in [(0.01, 0.4), (0.03, 0.5), (0.1, 0.5)]}
    # the best; of equals, the smaller lr
    assert sweep.best_lr(done, "rl", "13", [0.1, 0.03, 0.01]) == 0.03


@pytest.mark.slow
def test_sweep_smoke_on_a_tiny_model_runs_every_point_and_resumes(
        answer_folder, sevens_jsonl, tmp_path):
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "harness.sweep", "--model", answer_folder, "--data",
            sevens_jsonl, "--backend", "hf",
            "--budgets", "1,xs1", "--lrs", "0.01,0.1", "--extra-seeds-for", "1", "--val", "2",
            "--eval-limit", "0", "--out", str(out),
            "--batch-prompts", "2", "--group-size", "4", "--max-new-tokens", "6", "--steps", "2",
            "--mini-batches", "1",
            "--reward", "strict"]
    p = subprocess.run(argv, cwd=HERE, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in open(out / "results.jsonl")]
    names = {(r["name"], r["split"]) for r in rows}
    for m in ("rl", "sft"):
        # LoRA-XS r = 1 untied: one scalar per module (2 layers × 7)
        for b, params in (("1", 1), ("xs1", 14)):
            assert all((f"{m}-{b}-lr{lr:g}-s0", "val") in names for lr in (0.01, 0.1))
            lr = sweep.best_lr({k: r for r in rows for k in [(r["name"], r["split"])]}, m, b,
                               [0.01, 0.1])
            test = [r for r in rows if (r["split"], r["method"], r["budget"]) == ("test", m, b)]
            assert sorted(r["seed"] for r in test) == ([0, 1] if b == "1" else [0])
            assert {r["lr"] for r in test} == {lr}
            assert test[0]["params"] == params and len(test[0]["verdicts"]) == test[0]["n"] == 6
    table = (out / "table.md").read_text()
    assert table.count("\n| rl |") == 2 and table.count("\n| sft |") == 2
    assert (out / "accuracy.png").stat().st_size > 1000
    # a second run finds every evaluation on file and trains nothing
    p = subprocess.run(argv, cwd=HERE, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and [json.loads(x) for x in open(out / "results.jsonl")] == rows
    assert "grpo" not in p.stderr and "sft:" not in p.stderr
