"""Scale-out: torchrun with gloo on CPU gives the single-process update; its pieces, proven one by
one."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import rollout
import train_grpo as tg
from harness import dist
from harness.tests.test_train_grpo import HERE, run, run_state, tiny_run_args


def torchrun(nproc, *argv, script="train_grpo.py", timeout=600):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run",
                           f"--nproc-per-node={nproc}",
                           f"--master-port={port}", "--master-addr=127.0.0.1", script, *argv],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)


def test_shard_gives_each_rank_its_part_of_every_mini_batch():
    for B, M, K in [(8, 2, 2), (12, 3, 2), (6, 1, 3), (4, 2, 1)]:
        parts = [dist.shard(B, k, K, M) for k in range(K)]
        assert sorted(i for p in parts for i in p) == list(range(B))
        # mini-batch m of every rank = the prompts of the one-process mini-batch m
        for m in range(M):
            local = [p[m * len(p) // M:(m + 1) * len(p) // M] for p in parts]
            assert sorted(i for x in local for i in x) == list(range(m * B // M, (m + 1) * B // M))
    with pytest.raises(ValueError, match="do not split"):
        dist.shard(6, 0, 2, 2)


def test_a_global_batch_that_does_not_split_into_whole_groups_per_rank_is_refused(
        monkeypatch, tiny_folder):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError,
                       match=r"--batch-prompts 6 does not split into --mini-batches 2 × 2 ranks"):
        tg.get_args(["--model", tiny_folder, "--data", "arith", "--batch-prompts", "6",
                     "--mini-batches", "2"])
    with pytest.raises(ValueError, match="--tensor-parallel 3 must divide the 2 ranks"):
        tg.get_args(["--model", tiny_folder, "--data", "arith", "--batch-prompts", "8",
                     "--tensor-parallel", "3"])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_per_rank_weights_with_global_totals_add_up_to_the_whole_batch(mode):
    mask = tg.completion_mask([3, 1, 4, 2, 5, 2], 5)  # (6, 5)
    whole = tg.agg_weights(mask, mode, 5)
    n_tokens = mask.sum().item()
    halves = [tg.agg_weights(mask[s], mode, 5, n_tokens, 6) for s in (slice(0, 3), slice(3, 6))]
    assert torch.equal(torch.cat(halves), whole)


def test_gumbel_sampling_draws_from_the_softmax_and_ignores_the_batch():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]]).repeat(4000, 1)  # (4000, 4)
    rec = rollout.SamplerLogprobs(0.7, seeds=list(range(4000)))
    picks = rec(torch.zeros(4000, 1, dtype=torch.long), logits).argmax(1)
    freq = torch.bincount(picks, minlength=4).float() / 4000
    p = (logits[0] / 0.7).softmax(0)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / 4000).sqrt().max()  # 4 sigma
    assert torch.allclose(rec.prev[0], p.log())  # the recorded log π is the unperturbed one
    one = rollout.SamplerLogprobs(0.7, seeds=[17])
    alone = one(torch.zeros(1, 1, dtype=torch.long), logits[:1]).argmax(1)
    assert alone.item() == picks[17].item()  # row 17's draw does not depend on the other 3999 rows


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_and_resume_across_rank_counts(
        answer_folder, sevens_jsonl, tmp_path, monkeypatch):
    """2 steps with 4 prompts × 8 samples and 2 mini-batches: one process, torchrun with 2 ranks,
    and 1 step on 2 ranks resumed to 2 steps on 1 process give the same v, Adam state and log
    rows."""
    def argv(out, steps=2):
        flags_ = tiny_run_args(answer_folder, sevens_jsonl, out)[:-2] + ["--out", str(out)]
        return [a if a != "5" else str(steps) for a in flags_]
    fix = ["--batch-prompts", "4"]
    # the ranks' thread count (torchrun's): sums in the same order
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    p = run(*argv(tmp_path / "one"), *fix)
    assert p.returncode == 0, p.stderr[-2000:]
    p = torchrun(2, *argv(tmp_path / "two"), *fix)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 ranks" in p.stdout
    p = torchrun(2, *argv(tmp_path / "mixed", steps=1), *fix)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run("--resume", str(tmp_path / "mixed"), "--steps", "2")
    assert p.returncode == 0 and "resumed at step 1" in p.stdout, p.stderr[-2000:]
    want = run_state(tmp_path / "one")
    signal = len({r["reward"] for r in want[3]}) > 1 or want[0]["v"].abs().sum() > 0
    assert signal, "no learning signal"
    for name in ("two", "mixed"):
        got = run_state(tmp_path / name)
        for k in ("v", "exp_avg", "exp_avg_sq"):
            diff = (got[0][k] - want[0][k]).abs().max()
            assert torch.allclose(got[0][k], want[0][k], rtol=1e-5, atol=1e-8), (name, k, diff)
        assert got[1:3] == want[1:3]
        for a, b in zip(got[3], want[3]):
            assert a.keys() == b.keys(), (name, a, b)
            assert all(a[k] == b[k] if isinstance(a[k], str) else
                       a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in a), (name, a, b)
        print(name, "max |Δv| vs one process:", (got[0]["v"] - want[0]["v"]).abs().max().item())


@pytest.mark.slow
def test_eval_on_two_ranks_gives_the_one_process_report(tiny_folder, tmp_path):
    argv = ["--model", tiny_folder, "--data", "arith", "--backend", "hf", "--limit", "10",
            "--max-new-tokens", "6"]
    p = run(*argv, "--out", str(tmp_path / "one.json"), script="eval.py")
    assert p.returncode == 0, p.stderr[-2000:]
    p = torchrun(2, *argv, "--out", str(tmp_path / "two.json"), script="eval.py")
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = (json.load(open(tmp_path / f"{n}.json")) for n in ("one", "two"))
    strip = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert one["problems"] == two["problems"]
    assert strip(one["models"]["base"]) == strip(two["models"]["base"])


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_others_fast(answer_folder, sevens_jsonl, tmp_path):
    out = tmp_path / "run"
    argv = tiny_run_args(answer_folder, sevens_jsonl, out)[:-2] + [
        "--out", str(out), "--batch-prompts", "4", "--steps", "200", "--dist-timeout", "60"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                             f"--master-port={port}",
                             "--master-addr=127.0.0.1", "train_grpo.py", *argv], cwd=HERE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, t0 = out / "log.jsonl", time.time()
    while not (log.exists() and log.read_text().count("\n") >= 1) and time.time() - t0 < 300:
        time.sleep(0.1)
    rank1 = [pid for pid in os.listdir("/proc") if pid.isdigit() and worker_rank(pid) == "1"]
    assert rank1, "rank 1 not found"
    os.kill(int(rank1[0]), 9)
    t_kill = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t_kill < 60
    assert "train_grpo.py FAILED" in err and "rank      : 1" in err, err[-2000:]


def worker_rank(pid):
    """RANK of a torchrun worker running train_grpo.py from this test, else None."""
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    if b"train_grpo.py" not in cmd or b"torch.distributed.run" in cmd:
        return None
    ranks = [e[5:].decode() for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None
