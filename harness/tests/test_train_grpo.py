"""Tests of train_grpo.py: advantages, the loss against a token-by-token reference, the update's
direction, micro-batching, π_old, the CLI, and an exact resume after kill -9. CPU only, no network.
Run: pytest -q harness/tests/test_train_grpo.py"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

import task
import tinylora
import train_grpo as tg
import rollout
from harness import flags, memory
from harness.tests.fixtures import SMOL_GGUF, need_shared, tiny_model

HP = dict(eps_low=0.2, eps_high=0.4, tis_cap=2.0)
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

HERE = flags.ROOT


# ---- advantages, aggregation, loss ---------------------------------------------------------------

def test_group_advantages_hand_computed():
    A = tg.group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), 4)
    # group 1: mean .25, unbiased std .5 -> (1-.25)/.5 = 1.5, (0-.25)/.5 = -.5; group 2 constant ->
    # 0
    assert torch.allclose(A, torch.tensor([1.5, -.5, -.5, -.5, 0, 0, 0, 0]), atol=1e-5)
    assert not torch.isnan(tg.group_advantages(torch.zeros(8), 4)).any()


def test_aggregations_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert (loss * tg.agg_weights(mask, "token-mean", 5)).sum().item() == pytest.approx(10 / 4)
    def agg(mode):
        return (loss * tg.agg_weights(mask, mode, 5)).sum().item()
    assert agg("seq-mean-token-mean") == pytest.approx((2 + 4) / 2)
    assert agg("seq-mean-token-sum-norm") == pytest.approx(10 / (2 * 5))
    with pytest.raises(ValueError):
        tg.agg_weights(mask, "nope", 5)


def test_ppo_clip_loss_hand_computed():
    old_lp = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]))  # ρ = 1, 1.5, 0.5
    A = torch.tensor([1.0, -1.0])
    pg, rho = tg.ppo_clip_loss(logp, old_lp, A, 0.2, 0.4)
    # A>0: -min(ρ, clip(ρ, .8, 1.4)) = -1, -1.4, -0.5 ; A<0: -min(-ρ, -clip) = max(ρ, clip) = 1,
    # 1.5, 0.8
    assert torch.allclose(pg, torch.tensor([[-1.0, -1.4, -0.5], [1.0, 1.5, 0.8]]), atol=1e-6)
    assert torch.allclose(rho[0], torch.tensor([1.0, 1.5, 0.5]))


def test_tis_weight_caps_at_2_and_carries_no_gradient():
    old_lp = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    w = tg.tis_weight(old_lp, torch.tensor([0.0, -0.5, -5.0]), 2.0)
    assert torch.allclose(w, torch.tensor([1.0, 1.6487213, 2.0])) and not w.requires_grad


def test_lr_warmup_then_constant():
    assert [task.lr_at(s, 100, 1.0, 0.05) for s in (0, 1, 4, 5, 50)] == [0.2, 0.4, 1.0, 1.0, 1.0]
    assert task.lr_at(0, 10, 1.0, 0.0) == 1.0


# ---- the loss, token by token: an obviously-correct reference ------------------------------------

def reference_loss(
        logp, old_lp, sampler_lp, A, lengths, mode, max_new, eps_low=0.2, eps_high=0.4,
        tis_cap=2.0):
    """The GRPO loss straight from the formulas, one token at a time; returns (loss, clip_low,
    clip_high)."""
    per_seq, clip_low, clip_high = [], 0, 0
    for i, n in enumerate(lengths):
        terms = []
        for t in range(n):
            ratio = torch.exp(logp[i, t] - old_lp[i, t])
            clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            # a constant: no gradient
            tis = min(math.exp(old_lp[i, t].item() - sampler_lp[i, t].item()), tis_cap)
            terms.append(-torch.minimum(ratio * A[i], clipped * A[i]) * tis)
            clip_low += int(A[i] < 0 and ratio.item() < 1 - eps_low)
            clip_high += int(A[i] > 0 and ratio.item() > 1 + eps_high)
        per_seq.append(terms)
    if mode == "token-mean":
        loss = sum(sum(ts) for ts in per_seq) / sum(lengths)
    elif mode == "seq-mean-token-mean":
        loss = sum(sum(ts) / len(ts) for ts in per_seq) / len(per_seq)
    else:  # seq-mean-token-sum-norm (Dr. GRPO): every sequence normalised by the generation budget
        loss = sum(sum(ts) for ts in per_seq) / (len(per_seq) * max_new)
    return loss, clip_low, clip_high


@settings(max_examples=60, deadline=None)
@given(data=st.data(), B=st.integers(1, 4), C=st.integers(1, 6), mode=st.sampled_from(MODES))
def test_grpo_loss_equals_the_token_by_token_reference(data, B, C, mode):
    lengths = data.draw(st.lists(st.integers(1, C), min_size=B, max_size=B))
    def floats(lo, hi, n):
        return torch.tensor(data.draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n)))
    old_lp = floats(-4, 0, B * C).view(B, C)
    # ratios on both sides of the clip range
    logp = (old_lp + floats(-0.6, 0.6, B * C).view(B, C)).requires_grad_()
    # π_old/π_rollout on both sides of the TIS cap e^0.69
    sampler_lp = old_lp - floats(-1.5, 1.5, B * C).view(B, C)
    A = floats(-2, 2, B)
    mask = tg.completion_mask(lengths, C)
    loss, lo, hi = tg.grpo_loss(logp, old_lp, sampler_lp, A, tg.agg_weights(mask, mode, 8), mask,
                                **HP)
    ref, rlo, rhi = reference_loss(logp, old_lp, sampler_lp, A, lengths, mode, 8)
    g, = torch.autograd.grad(loss, logp)
    gr, = torch.autograd.grad(ref, logp)
    assert torch.allclose(loss, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(g, gr, atol=1e-6, rtol=1e-5)
    assert (lo, hi) == (rlo, rhi)


def test_tis_and_clipping_act_exactly_as_the_formulas_say():
    # one sequence, 3 tokens: ρ = 1, 1.6, 0.5; π_old/π_rollout = 1, e^5 (capped at 2), e^0.1
    old_lp = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.0, 1.6, 0.5]])).requires_grad_()
    sampler_lp = old_lp - torch.tensor([[0.0, 5.0, 0.1]])
    mask = torch.ones(1, 3)
    w = tg.agg_weights(mask, "token-mean", 8)
    # A > 0: ρ = 1.6 clipped
    for adv, want, clips in [(1.0, [-1 / 3, 0.0, -0.5 * math.exp(0.1) / 3], (0, 1)),
                             # A < 0: ρ = 0.5 clipped; TIS 2
                             (-1.0, [1 / 3, 1.6 * 2.0 / 3, 0.0], (1, 0))]:
        loss, lo, hi = tg.grpo_loss(logp, old_lp, sampler_lp, torch.tensor([adv]), w, mask, **HP)
        g, = torch.autograd.grad(loss, logp)
        assert torch.allclose(g, torch.tensor([want]), atol=1e-6), (adv, g)
        assert (lo, hi) == clips


# ---- masks and log-probs -------------------------------------------------------------------------

def test_token_logprobs_mask_prompt_padding_and_match_unpadded():
    m = tiny_model("qwen2", vocab=300, layers=2)
    seqs = [([5, 6, 7, 8], [9, 10, 11]), ([3], [4, 5, 6, 7, 8]), ([1, 2], [3])]
    lp = tg.token_logprobs(m, seqs, temperature=0.7)
    mask = tg.completion_mask([len(c) for _, c in seqs], 5)
    assert lp.shape == (3, 5)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    # each row equals the same sequence alone, without any padding
    for i, (p, c) in enumerate(seqs):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = m(ids).logits[0, len(p) - 1:-1] / 0.7
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        assert torch.allclose(lp[i, :len(c)], ref, atol=1e-5)


# ---- the update on a tiny random Qwen2 -----------------------------------------------------------

def update(m, bank, opt, seqs, A, sampler_lp, lrs, mode="token-mean", micro_batch=3):
    return tg.policy_update(m, bank, opt, seqs, A, sampler_lp, lrs, micro_batch=micro_batch,
                            temperature=1.0,
                           loss_agg=mode, max_new=8, grad_clip=1.0, **HP)


def batch_of_sequences(n=7, seed=0):
    """n (prompt, completion) pairs with prompts of different lengths and uneven completions (1..6
    tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, 300, (2 + i % 3,), generator=g).tolist(),
             torch.randint(3, 300, (1 + (5 * i) % 6,), generator=g).tolist()) for i in range(n)]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_update_moves_the_log_prob_in_the_direction_of_the_advantage(sign):
    m = tiny_model("qwen2", vocab=300, layers=2)
    bank = tinylora.apply_tinylora(m, params=13)
    seq = ([5, 6, 7], [8, 9, 10, 11])
    lp0 = tg.token_logprobs(m, [seq], 1.0).sum()
    grad, = torch.autograd.grad(lp0, bank.v)  # ∂ log π(completion) / ∂v, by autograd directly
    opt = torch.optim.AdamW([bank.v], lr=1e-3, weight_decay=0.0)
    update(m, bank, opt, [seq], torch.tensor([sign]), tg.token_logprobs(m, [seq], 1.0).detach(),
           [1e-3])
    dv = bank.v.detach()  # v started at 0
    # Adam's first step: lr · sign(A · ∂logπ/∂v)
    assert torch.equal(torch.sign(dv), torch.sign(sign * grad))
    with torch.no_grad():
        lp1 = tg.token_logprobs(m, [seq], 1.0).sum()
    assert sign * (lp1 - lp0) > 0  # rewarded: more likely; punished: less likely
    assert (lp1 - lp0).item() == pytest.approx((grad * dv).sum().item(), rel=0.05)  # first order


@pytest.mark.parametrize("mode", MODES)
def test_micro_batched_gradient_equals_the_whole_batch_reference(mode):
    m = tiny_model("qwen2", vocab=300, layers=2)
    bank = tinylora.apply_tinylora(m, params=5)
    with torch.no_grad():
        bank.v.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    seqs = batch_of_sequences(14)
    lengths, C = [len(c) for _, c in seqs], max(len(c) for _, c in seqs)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        cur = tg.token_logprobs(m, seqs, 1.0)
    old_lp = cur + 0.5 * torch.randn(cur.shape, generator=g)  # ratios across the clip range
    # and TIS weights across the cap
    sampler_lp = old_lp - 1.5 * torch.randn(cur.shape, generator=g)
    A = torch.randn(14, generator=g)
    idx = list(range(7, 14))  # the second mini-batch: its own rows, not the first ones
    mask = tg.completion_mask(lengths, C)[idx]
    w = tg.agg_weights(mask, mode, 8)
    grads = {}
    for mb in (3, 7):  # 3 does not divide 7: micro-batches of 3, 3, 1
        bank.v.grad = None
        tg.accumulate_grad(m, seqs, idx, old_lp, sampler_lp, A, w, mask, mb, 1.0, **HP)
        grads[mb] = bank.v.grad.clone()
    ref, _, _ = reference_loss(tg.token_logprobs(m, [seqs[i] for i in idx], 1.0), old_lp[idx],
                               sampler_lp[idx], A[idx],
                               [lengths[i] for i in idx], mode, 8)
    gref, = torch.autograd.grad(ref, bank.v)
    assert gref.abs().max() > 0
    for mb, grad in grads.items():
        assert torch.allclose(grad, gref, rtol=1e-4, atol=1e-7), (mb, grad, gref)


def test_pi_old_is_the_policy_before_the_first_step_with_one_or_two_mini_batches():
    seqs = batch_of_sequences(8)
    A = torch.tensor([1.0, -1, 0.5, -0.5, 2, -2, 1, -1])
    olds = []
    for M in (1, 2):
        m = tiny_model("qwen2", vocab=300, layers=2)
        bank = tinylora.apply_tinylora(m, params=5)
        with torch.no_grad():
            bank.v.fill_(0.2)
            before = tg.token_logprobs(m, seqs, 1.0)
        opt = torch.optim.AdamW([bank.v], lr=1e-1, weight_decay=0.0)
        old_lp, _ = update(m, bank, opt, seqs, A, before, [1e-1] * M)
        mask = tg.completion_mask([len(c) for _, c in seqs], before.shape[1]).bool()
        # not the policy after the first step
        assert torch.allclose(old_lp[mask], before[mask], atol=1e-5)
        assert not torch.allclose(bank.v, torch.full_like(bank.v, 0.2))
        olds.append(old_lp)
    assert torch.allclose(olds[0], olds[1], atol=1e-5)


def grouped_sequences(n_groups=3, G=4, seed=0, vocab=300):
    """n_groups prompts of different lengths (2, 5, 8 ...), G completions each, of uneven lengths
    (1..6)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for k in range(n_groups):
        p = torch.randint(3, vocab, (2 + 3 * k,), generator=g).tolist()
        seqs += [(p, torch.randint(3, vocab, (1 + (3 * j + k) % 6,), generator=g).tolist())
                 for j in range(G)]
    return seqs


def shared_vs_plain(m, bank, seqs, G):
    """Per-token log-probs and the gradient of v of a weighted sum, with and without the shared
    prompt."""
    mask = tg.completion_mask([len(c) for _, c in seqs], max(len(c) for _, c in seqs))
    w = torch.randn(mask.shape, generator=torch.Generator().manual_seed(7)) * mask
    out = []
    for g in (G, 1):
        lp = tg.token_logprobs(m, seqs, 0.8, G=g)
        out.append((lp.detach(), torch.autograd.grad((lp * w).sum(), bank.v)[0]))
    return out, mask.bool()


def test_shared_prompt_pass_equals_the_unshared_one_tiny():
    m = tiny_model("qwen2", vocab=300, layers=2)
    bank = tinylora.apply_tinylora(m, params=5)
    with torch.no_grad():
        bank.v.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    for prefix in ([], [5, 6, 7, 8, 9]):  # none shared by all prompts, or one (a few-shot prefix)
        seqs = [(prefix + p, c) for p, c in grouped_sequences()]
        ((shared, gs), (plain, gp)), mask = shared_vs_plain(m, bank, seqs, 4)
        assert (shared - plain)[mask].abs().max() <= 1e-5
        assert torch.allclose(gs, gp, rtol=1e-5, atol=1e-8) and gp.abs().max() > 0
    with pytest.raises(ValueError, match="share a prompt"):
        tg.token_logprobs(m, grouped_sequences(G=4)[1:5], 1.0, G=4)


@pytest.mark.slow
def test_shared_prompt_pass_equals_the_unshared_one_smollm2(smol):
    """On the real 30-layer model, in fp64 (the adapter too): the same log-probs to round-off, and
    the same gradient to 1e-5 of its norm -- RMSNorm computes in fp32 inside transformers, so fp64
    stops there. In fp32 both passes are ~3e-5 from each other and from an fp64 reference (README:
    Speed)."""
    import copy
    model = copy.deepcopy(smol[0]).double()
    bank = tinylora.apply_tinylora(model, params=13)
    model.double(), bank.double()
    with torch.no_grad():
        bank.v.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    seqs = grouped_sequences(n_groups=2, G=3, vocab=49152)
    ((shared, gs), (plain, gp)), mask = shared_vs_plain(model, bank, seqs, 3)
    assert (shared - plain)[mask].abs().max() <= 1e-10
    assert (gs - gp).norm() <= 1e-5 * gp.norm()


def test_micro_batches_hold_whole_groups_within_the_caps():
    # 3 groups of 4; longest first: 4..7, 0..3, 8..11
    lengths = [(5, 3)] * 4 + [(9, 6)] * 4 + [(2, 1)] * 4
    g0, g1, g2 = list(range(4)), list(range(4, 8)), list(range(8, 12))
    assert tg.micro_batches(lengths, 8, G=4) == [g1 + g0, g2]
    assert tg.micro_batches(lengths, 3, G=4) == [g1, g0, g2]
    # tokens with a shared prompt: groups·Lp + samples·C; 9 + 4·6 = 33, then 2·9 + 8·6 = 66 > 40
    assert tg.micro_batches(lengths, 12, G=4, max_tokens=40) == [g1, g0 + g2]
    assert tg.micro_batches(lengths, 12, G=4, max_tokens=66) == [g1 + g0, g2]
    assert tg.micro_batches([(5, 3)] * 5, 2) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_update_with_the_shared_prompt_equals_the_unshared_update(mini_batches):
    seqs = grouped_sequences(n_groups=4, G=3)
    A = torch.randn(12, generator=torch.Generator().manual_seed(3))
    results = []
    for G in (3, 1):
        m = tiny_model("qwen2", vocab=300, layers=2)
        bank = tinylora.apply_tinylora(m, params=5)
        with torch.no_grad():
            sampler_lp = tg.token_logprobs(m, seqs, 1.0) - 0.1
        opt = torch.optim.AdamW([bank.v], lr=1e-2, weight_decay=0.0)
        old_lp, stats = tg.policy_update(m, bank, opt, seqs, A, sampler_lp, [1e-2] * mini_batches,
                                      micro_batch=5,
                                      temperature=1.0, loss_agg="token-mean", max_new=8,
                                      grad_clip=1.0, G=G, **HP)
        results.append((old_lp, bank.v.detach().clone(), stats["grad_norm"]))
    (o1, v1, g1), (o2, v2, g2) = results
    # padded positions are never used
    mask = tg.completion_mask([len(c) for _, c in seqs], o1.shape[1]).bool()
    assert torch.allclose(o1[mask], o2[mask], atol=1e-5) and torch.allclose(v1, v2, atol=1e-6)
    assert g1 == pytest.approx(g2, rel=1e-4)


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_policy_update_changes_v_and_only_v(smol_tok, mini_batches):
    m = tiny_model("qwen2", vocab=len(smol_tok), layers=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bank = tinylora.apply_tinylora(m, params=13)
    shots = task.load_task("arith", "test")[1]
    prompts = [p for _, p in task.prompt_ids(smol_tok, task.arith_rows("test")[:2], shots, 512)]
    torch.manual_seed(0)
    comps = rollout.generate_hf(m, smol_tok, prompts, 4, 8, 1.0, [smol_tok.eos_token_id])
    assert len(comps) == 8 and all(len(c["ids"]) == len(c["logprobs"]) for c in comps)
    seqs = [(prompts[i // 4], c["ids"]) for i, c in enumerate(comps)]
    sampler_lp = tg.padded_logprobs(comps)
    assert sampler_lp.shape == (8, max(len(c["ids"]) for c in comps))
    A = tg.group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0]), 4)
    opt = torch.optim.AdamW([bank.v], lr=1e-2, weight_decay=0.0)
    old_lp, stats = update(m, bank, opt, seqs, A, sampler_lp, [1e-2] * mini_batches)
    # the sampler's log-probs (HF generate, recorded after temperature) equal the trainer's π_old
    mask = sampler_lp != 0
    assert (old_lp - sampler_lp)[mask].abs().max() < 1e-4
    assert bank.v.abs().min() > 0 and stats["grad_norm"] > 0
    tinylora.remove_tinylora(m)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    items = list(range(10))
    epoch0 = [x for s in range(5) for x in task.batch_at(items, s, 2, 0)]
    assert sorted(epoch0) == items and epoch0 != items  # a permutation, not the file order
    assert task.batch_at(items, 7, 2, 0) == task.batch_at(items, 7, 2, 0)
    assert task.batch_at(items, 7, 2, 0) != task.batch_at(items, 7, 2, 1)
    assert sorted(x for s in range(5, 10) for x in task.batch_at(items, s, 2, 0)) == items


# ---- end to end: CLI errors, bad data, and an exact resume after kill -9 -------------------------

def run(*argv, timeout=600, script="train_grpo.py"):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=HERE,
                          env=env, timeout=timeout)


@pytest.mark.parametrize("argv,msg", [
    (["--params", "0"], "must be positive"),
    (["--batch-prompts", "5", "--mini-batches", "2"], "does not split"),
    (["--model", "/nope/m.gguf"], "model file not found"),
    (["--data", "/nope/d.jsonl"], "data file not found"),
    (["--u", "1"], "go together"),
    (["--model", "/nope/folder"], "cannot load model"),
])
def test_bad_flags_give_one_line_and_exit_2(tmp_path, argv, msg):
    out = tmp_path / "run"
    p = run(*argv, "--out", str(out))
    assert p.returncode == 2 and msg in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr
    assert not out.exists()


# end to end; every other defect: test_task.py, in-process
@pytest.mark.parametrize("content,msg", [
    (b"", "no rows"),
    (b'{"question": "q", "answer": "#### 3"}\nnot json\n', "line 2: not valid JSON"),
])
def test_bad_data_files_give_one_error_line_and_write_nothing(tiny_folder, tmp_path, content, msg):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    out = tmp_path / "run"
    p = run("--model", tiny_folder, "--backend", "hf", "--data", str(data), "--out", str(out))
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and msg in err[0], p.stderr[-800:]
    assert str(data) in err[0], p.stderr[-800:]
    assert "Traceback" not in p.stderr and not out.exists()


@pytest.mark.slow
def test_bad_adapter_flags_on_a_real_model_write_nothing(tmp_path):
    need_shared(SMOL_GGUF)
    for argv, msg in [(["--params", "100000"], "nearest feasible"),
                      (["--targets", "q_proj,wq"], "not found")]:
        out = tmp_path / "run"
        p = run("--preset", "cpu-demo", "--backend", "hf", *argv, "--out", str(out))
        assert p.returncode == 2 and msg in p.stderr, p.stderr[-500:]
        assert not out.exists()


def tiny_run_args(folder, data, out):
    return ["--model", folder, "--data", data, "--backend", "hf", "--batch-prompts", "2",
            "--group-size", "8",
            "--max-new-tokens", "6", "--steps", "5", "--lr", "0.05", "--mini-batches", "2",
            "--micro-batch", "5",
            "--warmup", "0", "--eval-n", "0", "--sample-every", "0", "--reward", "strict", "--out",
            str(out)]


def run_state(out):
    """Everything a resumed run must reproduce: v, the Adam state, the log (less its timings), the
    adapter."""
    t, meta = tinylora.read_safetensors(str(out / "checkpoint.safetensors"), "trainer",
                                        "checkpoint")
    log = [{k: v for k, v in json.loads(x).items() if not k.startswith("t_")}
           for x in open(out / "log.jsonl")]
    v = tinylora.read_adapter(str(out / "adapter.safetensors"))[0]
    return t, meta["adam_step"], meta["step"], log, v


def test_resume_after_kill_9_and_a_torn_write_equals_the_uninterrupted_run(
        answer_folder, sevens_jsonl, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    p = run(*tiny_run_args(answer_folder, sevens_jsonl, full))
    assert p.returncode == 0, p.stderr[-2000:]
    want = run_state(full)
    assert want[0]["v"].abs().sum() > 0, "no learning signal"
    assert len({r["reward"] for r in want[3]}) > 1, "no learning signal"
    # kill -9 while step 3 is in flight (or between step 2's log row and its checkpoint)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train_grpo.py",
                             *tiny_run_args(answer_folder, sevens_jsonl, part)],
                            cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, t0 = part / "log.jsonl", time.time()
    while not (log.exists() and len(log.read_text().splitlines()) >= 2) and time.time() - t0 < 300:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(log.read_text().splitlines()) < 5, "the run finished before it could be killed"
    # a write torn by a kill leaves a temp file behind; the checkpoint itself is only ever renamed
    # into place
    (part / "checkpoint.safetensors.tmp999").write_bytes(b"\x00" * 20)
    (part / "adapter.safetensors.tmp999").write_bytes(b"torn")
    p = run("--resume", str(part))
    assert p.returncode == 0 and "resumed at step" in p.stdout, p.stderr[-2000:]
    got = run_state(part)
    for k in ("v", "exp_avg", "exp_avg_sq"):
        assert torch.allclose(got[0][k], want[0][k], atol=1e-6, rtol=1e-5), k
    assert got[1:3] == want[1:3] and got[3] == want[3]
    assert torch.allclose(got[4], want[4], atol=1e-6)
    assert not list(part.glob("*.tmp*"))  # stale temp files are cleared on resume
    # a run resumed after it had finished rewrites nothing but the adapter and the plot
    p = run("--resume", str(part))
    assert p.returncode == 0 and run_state(part)[3] == want[3]
    assert (full / "reward.png").stat().st_size > 1000


def test_proj_seed_fixes_P_and_the_factors_and_seed_only_the_data_and_samples(
        answer_folder, sevens_jsonl,
                                                                               tmp_path):
    def one(name, *flags):
        argv = tiny_run_args(answer_folder, sevens_jsonl, tmp_path / name)
        bank = tg.main([a if a != "5" else "1" for a in argv] + list(flags))
        log = [json.loads(x) for x in open(tmp_path / name / "log.jsonl")]
        P = {n: L.P.clone() for n, L in bank.layers.items()}
        return tinylora.read_adapter(str(tmp_path / name / "adapter.safetensors"))[1], P, log

    meta, P, log = one("a", "--seed", "0")
    meta_s, P_s, log_s = one("b", "--seed", "1")
    meta_p, P_p, _ = one("c", "--seed", "0", "--proj-seed", "1")
    # the adapter records P's seed
    assert meta["seed"] == meta_s["seed"] == 0 and meta_p["seed"] == 1
    # the sketch's factors
    assert meta["fingerprint"] == meta_s["fingerprint"] != meta_p["fingerprint"]
    assert all(torch.equal(P[n], P_s[n]) and not torch.equal(P[n], P_p[n]) for n in P)
    assert log[0]["reward"] != log_s[0]["reward"] or log[0]["len_mean"] != log_s[0]["len_mean"]
    with pytest.raises(ValueError, match=r"adapter plan differs.*'seed': \(0, 1\)"):
        tg.main(["--resume", str(tmp_path / "a"), "--proj-seed", "1", "--steps", "2"])


def test_the_gpu_recipe_on_a_machine_without_a_gpu_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no GPU here.*--preset cpu-demo.*--device cpu"):
        tg.get_args(["--params", "13"])
    demo = tg.get_args(["--params", "13", "--preset", "cpu-demo"])
    assert demo.model != "Qwen/Qwen2.5-7B-Instruct"


def test_the_console_config_names_every_resolved_value_within_100_columns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = tg.get_args(["--params", "13", "--preset", "cpu-demo"])
    config = dict(vars(args), resolved=dict(device="cpu", world_size=1))
    text = flags.summary(config)
    words = text.split()
    assert words[0] == "config:" and all(len(line) <= 100 for line in text.splitlines())
    assert {w.split("=", 1)[0] for w in words[1:]} == set(vars(args)) | {"device", "world_size"}
    assert "betas=(0.9,0.999)" in words and "lr=0.03" in words and "micro_batch=32" in words


def test_length_runs_pad_each_run_to_at_most_one_and_a_half_its_shortest():
    lengths = [15, 32, 14, 16, 15, 30, 1, 2]
    runs = tg.length_runs(lengths)
    assert runs == [[6], [7], [2, 0, 4, 3], [5, 1]]  # 1 | 2 | 14..16 | 30, 32
    assert sorted(i for r in runs for i in r) == list(range(len(lengths)))
    assert tg.length_runs([5] * 4) == [[0, 1, 2, 3]] and tg.length_runs([]) == []


def test_running_mean_hand_computed():
    from harness.metrics import running_mean
    assert running_mean([1, 0, 0, 1, 1], 2) == [1, 0.5, 0, 0.5, 1]
    assert running_mean([3, 1, 2], 4) == [3, 2, 2] and running_mean([], 4) == []


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
        lp = tg.token_logprobs(m, seqs, 1.0)
    forward[0] = False
    bank_v = [mod for mod in m.modules() if isinstance(mod, tinylora.TinyLoRALinear)][0].bank.v
    grad = torch.autograd.grad(lp.sum(), bank_v)[0]
    m.eval()
    for h in hooks:
        h.remove()
    # the (b, Lp + C) pass
    padded = len(seqs) * (max(len(p) for p, _ in seqs) + max(len(c) for _, c in seqs))
    return total[0] / (padded * len(m.model.layers)), grad


def test_checkpointed_loss_pass_gives_the_same_gradient_and_keeps_far_fewer_bytes():
    """Activation checkpointing (non-reentrant, every weight frozen, v outside the model): the same
    v-gradient, and the bytes kept per token per layer drop from all of a layer's activations to its
    input alone."""
    m = tiny_model("qwen2", vocab=300, hidden=128, inter=512, layers=2)
    bank = tinylora.apply_tinylora(m, params=13)
    with torch.no_grad():
        bank.v.normal_(0, 0.3)
    seqs = [([1, 2, 3, 4, 5, 6, 7, 8][:k], list(range(9, 9 + 2 * k))) for k in (3, 8, 5, 8)]
    plain, g0 = saved_bytes_per_token_per_layer(m, seqs, False)
    memory.set_checkpointing(m)
    kept, g1 = saved_bytes_per_token_per_layer(m, seqs, True)
    assert torch.allclose(g0, g1, rtol=1e-5, atol=1e-8)
    assert kept == 128 * 4 and plain / kept >= 5, (plain, kept)  # the fp32 layer input
    print(f"bytes kept per token per layer: {plain:,.0f} without checkpointing, {kept:,.0f} with "
          f"({plain / kept:.1f}×)")
    # the memory plan's per token and layer estimate
    est = memory.activation_bytes(128, 512, 1, 1, 4, False)
    assert 0.3 < est / plain < 1.5, (est, plain)
    # the shared-prompt pass would silently lose its cache
    with pytest.raises(ValueError, match="KV cache"):
        m.train()
        tg.token_logprobs(m, [([1, 2], [3]), ([1, 2], [4])], 1.0, G=2)
    m.eval()


def test_memory_plan_refuses_what_cannot_fit_and_passes_what_can():
    m = tiny_model("qwen2", vocab=300, hidden=128, inter=512, layers=2)
    text, fits = memory.memory_plan(m, 4096, False, 30 * 2 ** 30, 80 * 2 ** 30)
    assert fits and "memory plan" in text and "checkpointing off" in text
    assert not memory.memory_plan(m, 4096, False, 79 * 2 ** 30, 80 * 2 ** 30)[1]
    # the 7B recipe, micro-batch 8, no checkpointing
    big = memory.activation_bytes(3584, 18944, 28, 8 * 4608, 2, False)
    # ~190 GiB vs ~12 GiB
    assert big > 150 * 2 ** 30 > 8 * memory.activation_bytes(3584, 18944, 28, 4608, 2, True)


def test_micro_batches_go_longest_first_and_keep_groups_whole():
    lengths = [(5, 2), (5, 3), (4, 9), (4, 1), (6, 4), (6, 4)]
    mbs = tg.micro_batches(lengths, 2, G=2)
    assert mbs == [[2, 3], [4, 5], [0, 1]] and sorted(i for mb in mbs for i in mb) == list(range(6))
