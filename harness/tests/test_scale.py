"""Specifications of harness/scale.py: none of it changes a number. The fast loss pass gives
train_grpo.token_logprobs's numbers; micro-batches keep groups whole; checkpointing keeps the
gradient; torchrun with gloo on CPU gives the one-process update. CPU only, no network."""
import json
import os
import sys
import time

import pytest
import torch

import tinylora
import train_grpo as tg
from harness import config, scale
from harness.tests.fixtures import (cli, grouped_sequences, run_state, tiny_model, tiny_run_args,
                                    torchrun)


# ---- faster: the shared-prompt pass -----------------------------------------------------------

def fast_and_plain(m, bank, seqs, G):
    """Per-token log-probs and the gradient of v of a weighted sum, by the fast pass (G) and by
    train_grpo.token_logprobs."""
    mask = scale.length_mask([len(c) for _, c in seqs], max(len(c) for _, c in seqs))
    w = torch.randn(mask.shape, generator=torch.Generator().manual_seed(7)) * mask
    out = []
    for lp in (scale.token_logprobs(m, seqs, 0.8, G=G), tg.token_logprobs(m, seqs, 0.8)):
        out.append((lp.detach(), torch.autograd.grad((lp * w).sum(), bank.v)[0]))
    return out, mask.bool()


@pytest.mark.parametrize("G", [1, 4])
def test_the_fast_pass_gives_the_plain_passs_log_probs_and_gradient(G):
    m = tiny_model("qwen2", vocab=300, layers=2)
    bank = tinylora.apply_tinylora(m, params=5)
    with torch.no_grad():
        bank.v.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    for prefix in ([], [5, 6, 7, 8, 9]):  # no prefix common to all prompts, or one (the shots)
        seqs = [(prefix + p, c) for p, c in grouped_sequences()]
        ((fast, gf), (plain, gp)), mask = fast_and_plain(m, bank, seqs, G)
        assert (fast - plain)[mask].abs().max() <= 1e-5
        assert torch.allclose(gf, gp, rtol=1e-5, atol=1e-8) and gp.abs().max() > 0
    with pytest.raises(ValueError, match="share a prompt"):
        scale.token_logprobs(m, grouped_sequences(G=4)[1:5], 1.0, G=4)


@pytest.mark.slow
def test_the_fast_pass_gives_the_plain_passs_numbers_on_smollm2_in_fp64(smol):
    """On the real 30-layer model, in fp64 (the adapter too): the same log-probs to round-off, and
    the same gradient to 1e-5 of its norm (RMSNorm computes in fp32 inside transformers)."""
    import copy
    model = copy.deepcopy(smol[0]).double()
    bank = tinylora.apply_tinylora(model, params=13)
    model.double(), bank.double()
    with torch.no_grad():
        bank.v.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    seqs = grouped_sequences(n_groups=2, G=3, vocab=49152)
    ((fast, gf), (plain, gp)), mask = fast_and_plain(model, bank, seqs, 3)
    assert (fast - plain)[mask].abs().max() <= 1e-10
    assert (gf - gp).norm() <= 1e-5 * gp.norm()


def test_length_runs_pad_each_run_to_at_most_one_and_a_half_its_shortest():
    runs = scale.length_runs([15, 32, 14, 16, 15, 30, 1, 2])
    assert runs == [[6], [7], [2, 0, 4, 3], [5, 1]]  # 1 | 2 | 14..16 | 30, 32
    assert scale.length_runs([5] * 4) == [[0, 1, 2, 3]] and scale.length_runs([]) == []


# ---- through memory: micro-batches, checkpointing, the plan -----------------------------------

def test_micro_batches_hold_whole_groups_longest_first_within_the_caps():
    lengths = [(5, 3)] * 4 + [(9, 6)] * 4 + [(2, 1)] * 4  # 3 groups of 4
    g0, g1, g2 = list(range(4)), list(range(4, 8)), list(range(8, 12))
    assert scale.micro_batches(lengths, 8, G=4) == [g1 + g0, g2]
    assert scale.micro_batches(lengths, 3, G=4) == [g1, g0, g2]
    # tokens with a shared prompt: groups·Lp + samples·C; 9 + 4·6 = 33, then 2·9 + 8·6 = 66 > 40
    assert scale.micro_batches(lengths, 12, G=4, max_tokens=40) == [g1, g0 + g2]
    assert scale.micro_batches(lengths, 12, G=4, max_tokens=66) == [g1 + g0, g2]
    assert scale.micro_batches([(5, 3)] * 5, 2) == [[0, 1], [2, 3], [4]]
    mbs = scale.micro_batches([(5, 2), (5, 3), (4, 9), (4, 1), (6, 4), (6, 4)], 2, G=2)
    assert mbs == [[2, 3], [4, 5], [0, 1]]


def saved_bytes_per_token_per_layer(m, seqs, checkpointing):
    """Autograd memory of the decoder layers in one loss pass: every tensor saved for backward
    inside a layer (saved-tensor hooks), plus, with checkpointing, the layer input kept for the
    recompute (the checkpoint's own hooks hide the inner ones: that is the point). Returns (bytes
    per token per layer, v's gradient)."""
    inside, total, forward = [False], [0], [True]

    def enter(mod, args, kwargs):  # noqa: ARG001 (also runs in a recompute: not counted then)
        inside[0] = forward[0]
        if checkpointing and forward[0]:
            total[0] += kwargs.get("hidden_states", args[0] if args else None).nbytes

    def leave(*a):
        inside[0] = False
    hooks = [L.register_forward_pre_hook(enter, with_kwargs=True) for L in m.model.layers]
    hooks += [L.register_forward_hook(leave) for L in m.model.layers]

    def pack(t):
        total[0] += t.nbytes if inside[0] else 0
        return t
    m.train(checkpointing)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = scale.token_logprobs(m, seqs, 1.0)
    forward[0] = False
    bank_v = next(mod for mod in m.modules() if isinstance(mod, tinylora.TinyLoRALinear)).bank.v
    grad = torch.autograd.grad(lp.sum(), bank_v)[0]
    m.eval()
    for h in hooks:
        h.remove()
    padded = len(seqs) * (max(len(p) for p, _ in seqs) + max(len(c) for _, c in seqs))
    return total[0] / (padded * len(m.model.layers)), grad


def test_a_checkpointed_loss_pass_has_the_same_gradient_and_keeps_only_each_layers_input():
    m = tiny_model("qwen2", vocab=300, hidden=128, inter=512, layers=2)
    bank = tinylora.apply_tinylora(m, params=13)
    with torch.no_grad():
        bank.v.normal_(0, 0.3)
    seqs = [([1, 2, 3, 4, 5, 6, 7, 8][:k], list(range(9, 9 + 2 * k))) for k in (3, 8, 5, 8)]
    plain, g0 = saved_bytes_per_token_per_layer(m, seqs, False)
    scale.set_checkpointing(m)
    kept, g1 = saved_bytes_per_token_per_layer(m, seqs, True)
    assert torch.allclose(g0, g1, rtol=1e-5, atol=1e-8)
    assert kept == 128 * 4 and plain / kept >= 5, (plain, kept)  # the fp32 layer input
    print(f"bytes kept per token per layer: {plain:,.0f} without checkpointing, {kept:,.0f} with")
    est = scale.activation_bytes(128, 512, 1, 1, 4, False)  # the plan's per token and layer
    assert 0.3 < est / plain < 1.5, (est, plain)
    with pytest.raises(ValueError, match="KV cache"):  # the shared pass would lose its cache
        m.train()
        scale.token_logprobs(m, [([1, 2], [3]), ([1, 2], [4])], 1.0, G=2)
    m.eval()


def test_the_memory_plan_refuses_what_cannot_fit_and_passes_what_can():
    m = tiny_model("qwen2", vocab=300, hidden=128, inter=512, layers=2)
    text, fits = scale.memory_plan(m, 4096, False, 30 * 2 ** 30, 80 * 2 ** 30)
    assert fits and "memory plan" in text and "checkpointing off" in text
    assert not scale.memory_plan(m, 4096, False, 79 * 2 ** 30, 80 * 2 ** 30)[1]
    big = scale.activation_bytes(3584, 18944, 28, 8 * 4608, 2, False)  # the 7B, micro-batch 8
    assert big > 150 * 2 ** 30 > 8 * scale.activation_bytes(3584, 18944, 28, 4608, 2, True)


# ---- out: torchrun ----------------------------------------------------------------------------

def test_shard_gives_each_rank_its_part_of_every_mini_batch():
    for B, M, K in [(8, 2, 2), (12, 3, 2), (6, 1, 3), (4, 2, 1)]:
        parts = [scale.shard(B, k, K, M) for k in range(K)]
        assert sorted(i for p in parts for i in p) == list(range(B))
        for m in range(M):  # mini-batch m of every rank = the one-process mini-batch m
            local = [p[m * len(p) // M:(m + 1) * len(p) // M] for p in parts]
            assert sorted(i for x in local for i in x) == list(range(m * B // M, (m + 1) * B // M))
    with pytest.raises(ValueError, match="do not split"):
        scale.shard(6, 0, 2, 2)


def test_a_batch_that_does_not_split_into_whole_groups_per_rank_is_refused(monkeypatch,
                                                                          tiny_folder):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--batch-prompts 6 does not split into --mini-batches 2"):
        config.trainer_args(["--model", tiny_folder, "--data", "arith", "--batch-prompts", "6"])
    with pytest.raises(ValueError, match="--tensor-parallel 3 must divide the 2 ranks"):
        config.trainer_args(["--model", tiny_folder, "--data", "arith", "--batch-prompts", "8",
                     "--tensor-parallel", "3"])


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_and_resume_across_rank_counts(
        answer_folder, sevens_jsonl, tmp_path, monkeypatch):
    """2 steps of 4 prompts × 8 samples and 2 mini-batches: one process, torchrun with 2 ranks, and
    1 step on 2 ranks resumed to 2 steps on one process give the same v, Adam state and log."""
    def argv(out, steps=2):
        return tiny_run_args(answer_folder, sevens_jsonl, out, steps) + ["--batch-prompts", "4"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the ranks' thread count: sums in the same order
    p = cli("train_grpo.py", *argv(tmp_path / "one"))
    assert p.returncode == 0, p.stderr[-2000:]
    p = torchrun(2, "train_grpo.py", *argv(tmp_path / "two"))
    assert p.returncode == 0 and "2 ranks" in p.stdout, p.stderr[-3000:]
    p = torchrun(2, "train_grpo.py", *argv(tmp_path / "mixed", steps=1))
    assert p.returncode == 0, p.stderr[-3000:]
    p = cli("train_grpo.py", "--resume", str(tmp_path / "mixed"), "--steps", "2")
    assert p.returncode == 0 and "resumed at step 1" in p.stdout, p.stderr[-2000:]
    want = run_state(tmp_path / "one")
    assert len({r["reward"] for r in want[3]}) > 1 or want[0]["v"].abs().sum() > 0, "no signal"
    for name in ("two", "mixed"):
        got = run_state(tmp_path / name)
        for k in ("v", "exp_avg", "exp_avg_sq"):
            assert torch.allclose(got[0][k], want[0][k], rtol=1e-5, atol=1e-8), (name, k)
        assert got[1:3] == want[1:3]
        for a, b in zip(got[3], want[3]):
            assert a.keys() == b.keys(), (name, a, b)
            assert all(a[k] == b[k] if isinstance(a[k], str) else
                       a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in a), (name, a, b)


@pytest.mark.slow
def test_eval_on_two_ranks_gives_the_one_process_report(tiny_folder, tmp_path):
    argv = ["--model", tiny_folder, "--data", "arith", "--backend", "hf", "--limit", "10",
            "--max-new-tokens", "6"]
    p = cli("eval.py", *argv, "--out", str(tmp_path / "one.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    p = torchrun(2, "eval.py", *argv, "--out", str(tmp_path / "two.json"))
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = (json.load(open(tmp_path / f"{n}.json")) for n in ("one", "two"))
    assert one["problems"] == two["problems"]
    assert ({k: v for k, v in one["models"]["base"].items() if k != "seconds"}
            == {k: v for k, v in two["models"]["base"].items() if k != "seconds"})


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_others_fast(answer_folder, sevens_jsonl, tmp_path):
    import socket
    import subprocess
    from harness.tests.fixtures import ROOT
    out = tmp_path / "run"
    argv = tiny_run_args(answer_folder, sevens_jsonl, out, steps=200) + [
        "--batch-prompts", "4", "--dist-timeout", "60"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                             f"--master-port={port}", "--master-addr=127.0.0.1", "train_grpo.py",
                             *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
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
