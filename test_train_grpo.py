"""Specifications of train_grpo.py: the advantages, the loss against a token-by-token reference, the
plain log-probs, the update's direction, micro-batching and π_old, the command line, and an exact
resume after kill -9. CPU only, no network. Run: pytest -q test_train_grpo.py"""
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

import rollout
import task
import tinylora
import train_grpo as tg
from harness import config, scale
from harness.run import sampler_logprobs
from harness.tests.fixtures import (ROOT, cli, grouped_sequences, run_state, tiny_model,
                                    tiny_run_args)

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def hyper(mode="token-mean", max_new=8, kl_coef=0.0, entropy_coef=0.0):
    return tg.Hyper(eps_low=0.2, eps_high=0.4, dual_clip=0.0, tis_cap=2.0, loss_agg=mode,
                    max_new_tokens=max_new, kl_coef=kl_coef, entropy_coef=entropy_coef)


def how(micro_batch=3, G=1, plain=False, entropy=False):
    return tg.Pass(temperature=1.0, micro_batch=micro_batch, micro_tokens=0, G=G, plain=plain,
                   entropy=entropy)


# ---- advantages, aggregation, the loss --------------------------------------------------------

def test_group_advantages_hand_computed():
    A = tg.group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), 4)
    # group 1: mean .25, unbiased std .5: (1 − .25)/.5 = 1.5, (0 − .25)/.5 = −.5; group 2: constant
    assert torch.allclose(A, torch.tensor([1.5, -.5, -.5, -.5, 0, 0, 0, 0]), atol=1e-5)
    assert not torch.isnan(tg.group_advantages(torch.zeros(8), 4)).any()


def test_aggregations_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])

    def agg(mode):
        return (loss * tg.agg_weights(mask, mode, 5)).sum().item()
    assert agg("token-mean") == pytest.approx(10 / 4)
    assert agg("seq-mean-token-mean") == pytest.approx((2 + 4) / 2)
    assert agg("seq-mean-token-sum-norm") == pytest.approx(10 / (2 * 5))
    with pytest.raises(ValueError):
        tg.agg_weights(mask, "nope", 5)


def test_per_rank_weights_with_global_totals_add_up_to_the_whole_batch():
    mask = scale.length_mask([3, 1, 4, 2, 5, 2], 5)  # (6, 5)
    for mode in MODES:
        halves = [tg.agg_weights(mask[s], mode, 5, mask.sum().item(), 6)
                  for s in (slice(0, 3), slice(3, 6))]
        assert torch.equal(torch.cat(halves), tg.agg_weights(mask, mode, 5))


def test_ppo_clip_loss_hand_computed():
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]))  # ρ = 1, 1.5, 0.5
    pg, rho = tg.ppo_clip_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), 0.2, 0.4)
    # A > 0: −min(ρ, clip(ρ, .8, 1.4)) = −1, −1.4, −.5; A < 0: max(ρ, clip(ρ)) = 1, 1.5, .8
    assert torch.allclose(pg, torch.tensor([[-1.0, -1.4, -0.5], [1.0, 1.5, 0.8]]), atol=1e-6)
    assert torch.allclose(rho[0], torch.tensor([1.0, 1.5, 0.5]))


def test_the_dual_clip_caps_a_negative_advantages_loss_at_c_times_its_size():
    """verl's dual clip (c = 3): with A < 0 a ratio of 5 would cost 5·|A|; it costs 3·|A|, with no
    gradient; A > 0, or ratios under c, are untouched."""
    logp = torch.log(torch.tensor([[5.0, 2.0, 0.5], [5.0, 2.0, 0.5]])).requires_grad_()
    A = torch.tensor([-1.0, 1.0])
    pg, _ = tg.ppo_clip_loss(logp, torch.zeros(2, 3), A, 0.2, 0.4, dual_clip=3.0)
    assert torch.allclose(pg, torch.tensor([[3.0, 2.0, 0.8], [-1.4, -1.4, -0.5]]), atol=1e-6)
    g, = torch.autograd.grad(pg.sum(), logp)
    assert g[0, 0] == 0 and g[0, 1] != 0  # capped: no gradient; 2 < c: the plain PPO term
    assert torch.equal(tg.ppo_clip_loss(logp, torch.zeros(2, 3), A, 0.2, 0.4)[0][0, 0],
                       torch.tensor(5.0))  # c = 0: off


def test_the_forks_clip_and_weight_decay_in_this_parameterisations_units_give_its_update():
    """The fork scales ΔW by lora_alpha/r = 16: its v is ours / 16. Two AdamW steps of the fork (lr
    1.25e-4, weight decay 0.01, clip 1.0 on its gradient) and two of ours (the defaults: lr 2e-3,
    0.01/16, 1/16) from the same point move ΔW alike: the first gradient is clipped, the second is
    not, so Adam's moments see the clip."""
    args = config.trainer_args(["--device", "cpu"])

    def train(v0, scale_, lr, wd, clip):  # ΔW = scale · v; the loss ‖ΔW − target‖²
        v = torch.nn.Parameter(v0.clone())
        opt = torch.optim.AdamW([v], lr=lr, weight_decay=wd)
        for target, clipped in ((torch.tensor([[30.0, -20.0]]), True),
                                (torch.tensor([[0.51, 0.2]]), False)):
            opt.zero_grad()
            (scale_ * v - target).square().sum().backward()
            assert (v.grad.norm() > clip) == clipped
            tg.step_v(opt, lr, clip)
        return scale_ * v.detach()
    v_ours = torch.tensor([[0.5, 0.2]])
    fork = train(v_ours / 16, 16.0, 1.25e-4, 0.01, 1.0)
    ours = train(v_ours, 1.0, args.lr, args.weight_decay, args.grad_clip)
    assert torch.allclose(ours, fork, rtol=1e-7, atol=1e-9)
    assert (args.lr, args.weight_decay, args.grad_clip) == (2e-3, 0.01 / 16, 1 / 16)
    assert (args.dual_clip, args.shuffle, args.projections) == (3.0, False, "fork")


def test_tis_weight_caps_at_2_and_carries_no_gradient():
    old_lp = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    w = tg.tis_weight(old_lp, torch.tensor([0.0, -0.5, -5.0]), 2.0)
    assert torch.allclose(w, torch.tensor([1.0, 1.6487213, 2.0])) and not w.requires_grad


def reference_loss(logp, old_lp, sampler_lp, A, lengths, mode, max_new):
    """The GRPO loss straight from the formulas, one token at a time (ε 0.2/0.4, TIS cap 2);
    returns (loss, tokens clipped below, tokens clipped above)."""
    per_seq, clip_low, clip_high = [], 0, 0
    for i, n in enumerate(lengths):
        terms = []
        for t in range(n):
            ratio = torch.exp(logp[i, t] - old_lp[i, t])
            clipped = torch.clamp(ratio, 0.8, 1.4)
            tis = min(math.exp(old_lp[i, t].item() - sampler_lp[i, t].item()), 2.0)  # a constant
            terms.append(-torch.minimum(ratio * A[i], clipped * A[i]) * tis)
            clip_low += int(A[i] < 0 and ratio.item() < 0.8)
            clip_high += int(A[i] > 0 and ratio.item() > 1.4)
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
    logp = (old_lp + floats(-0.6, 0.6, B * C).view(B, C)).requires_grad_()  # across the clip
    sampler_lp = old_lp - floats(-1.5, 1.5, B * C).view(B, C)  # π_old/π_sampler across the cap
    A = floats(-2, 2, B)
    w = tg.agg_weights(scale.length_mask(lengths, C), mode, 8)
    loss, sums = tg.grpo_loss(logp, old_lp, sampler_lp, A, w, hyper(mode))
    lo, hi = sums["clip_low"], sums["clip_high"]
    ref, rlo, rhi = reference_loss(logp, old_lp, sampler_lp, A, lengths, mode, 8)
    g, = torch.autograd.grad(loss, logp)
    gr, = torch.autograd.grad(ref, logp)
    assert torch.allclose(loss, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(g, gr, atol=1e-6, rtol=1e-5) and (lo, hi) == (rlo, rhi)


def test_tis_and_clipping_act_exactly_as_the_formulas_say():
    # one sequence, 3 tokens: ρ = 1, 1.6, 0.5; π_old/π_sampler = 1, e^5 (capped at 2), e^0.1
    old_lp = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.0, 1.6, 0.5]])).requires_grad_()
    sampler_lp = old_lp - torch.tensor([[0.0, 5.0, 0.1]])
    w = tg.agg_weights(torch.ones(1, 3), "token-mean", 8)
    for adv, want, clips in [(1.0, [-1 / 3, 0.0, -0.5 * math.exp(0.1) / 3], (0, 1)),  # ρ 1.6 cut
                             (-1.0, [1 / 3, 1.6 * 2.0 / 3, 0.0], (1, 0))]:  # ρ 0.5 cut; TIS 2
        loss, sums = tg.grpo_loss(logp, old_lp, sampler_lp, torch.tensor([adv]), w, hyper())
        lo, hi = sums["clip_low"], sums["clip_high"]
        g, = torch.autograd.grad(loss, logp)
        assert torch.allclose(g, torch.tensor([want]), atol=1e-6), (adv, g)
        assert (lo, hi) == clips


# ---- the plain log-probs ----------------------------------------------------------------------

def test_token_logprobs_are_each_sequences_own_forward_right_padded():
    m = tiny_model("qwen2", vocab=300, layers=2)
    seqs = [([5, 6, 7, 8], [9, 10, 11]), ([3], [4, 5, 6, 7, 8]), ([1, 2], [3])]
    lp = tg.token_logprobs(m, seqs, temperature=0.7)
    assert lp.shape == (3, 5) and (lp[0, 3:] == 0).all() and (lp[2, 1:] == 0).all()
    for i, (p, c) in enumerate(seqs):  # each row: the sequence alone, no padding anywhere
        with torch.no_grad():
            logits = m(torch.tensor([p + c])).logits[0, len(p) - 1:-1] / 0.7
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        assert torch.allclose(lp[i, :len(c)], ref, atol=1e-5)


def test_step_v_clips_the_gradient_in_place_and_steps_at_the_given_lr():
    v = torch.nn.Parameter(torch.zeros(1, 2))
    opt = torch.optim.AdamW([v], lr=0.1, weight_decay=0.0)
    v.grad = torch.tensor([[3.0, 4.0]])
    assert tg.step_v(opt, 0.5, 1.0) == pytest.approx(5.0)  # the norm before clipping
    assert v.grad.norm().item() == pytest.approx(1.0) and opt.param_groups[0]["lr"] == 0.5
    assert torch.allclose(v.detach(), torch.tensor([[-0.5, -0.5]]), atol=1e-6)  # Adam: lr·sign


# ---- the update on a tiny random Qwen2 --------------------------------------------------------

def rollouts(seqs, A, sampler_lp, ref_lp=None):
    return tg.Rollouts(seqs, torch.as_tensor(A, dtype=torch.float32), sampler_lp, ref_lp)


def batch_of_sequences(n=7, seed=0):
    """n (prompt, completion) pairs, prompts of 2-4 tokens, uneven completions (1..6 tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, 300, (2 + i % 3,), generator=g).tolist(),
             torch.randint(3, 300, (1 + (5 * i) % 6,), generator=g).tolist()) for i in range(n)]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_update_moves_the_log_prob_in_the_direction_of_the_advantage(sign):
    m = tiny_model("qwen2", vocab=300, layers=2)
    bank = tinylora.apply_tinylora(m, params=13)
    seq = ([5, 6, 7], [8, 9, 10, 11])
    lp0 = tg.token_logprobs(m, [seq], 1.0).sum()
    grad, = torch.autograd.grad(lp0, bank.v)  # ∂ log π(completion) / ∂v
    opt = torch.optim.AdamW([bank.v], lr=1e-3, weight_decay=0.0)
    ro = rollouts([seq], [sign], tg.token_logprobs(m, [seq], 1.0).detach())
    tg.policy_update(m, opt, ro, [1e-3], hyper(), how(), 1.0)
    dv = bank.v.detach()  # v started at 0; Adam's first step is lr · sign(A · ∂logπ/∂v)
    assert torch.equal(torch.sign(dv), torch.sign(sign * grad))
    with torch.no_grad():
        lp1 = tg.token_logprobs(m, [seq], 1.0).sum()
    assert sign * (lp1 - lp0) > 0  # rewarded: more likely; punished: less likely
    assert (lp1 - lp0).item() == pytest.approx((grad * dv).sum().item(), rel=0.05)  # first order


@pytest.mark.parametrize("mode", MODES)
def test_a_micro_batched_mini_batch_has_the_whole_mini_batchs_gradient(mode):
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
    ro = rollouts(seqs, torch.randn(14, generator=g), old_lp - 1.5 * torch.randn(cur.shape,
                                                                                 generator=g))
    idx = list(range(7, 14))  # the second mini-batch: its own rows, not the first ones
    w = tg.agg_weights(scale.length_mask(lengths, C)[idx], mode, 8)
    ref, _, _ = reference_loss(tg.token_logprobs(m, [seqs[i] for i in idx], 1.0), old_lp[idx],
                               ro.sampler_lp[idx], ro.A[idx], [lengths[i] for i in idx], mode, 8)
    gref, = torch.autograd.grad(ref, bank.v)
    assert gref.abs().max() > 0
    for mb in (3, 7):  # 3 does not divide 7: micro-batches of 3, 3, 1
        bank.v.grad = None
        tg.minibatch_backward(m, ro, idx, old_lp, w, hyper(mode), how(mb))
        assert torch.allclose(bank.v.grad, gref, rtol=1e-4, atol=1e-7), (mb, bank.v.grad, gref)


def test_pi_old_is_the_policy_before_the_first_step_with_one_or_two_mini_batches():
    seqs = batch_of_sequences(8)
    olds = []
    for M in (1, 2):
        m = tiny_model("qwen2", vocab=300, layers=2)
        bank = tinylora.apply_tinylora(m, params=5)
        with torch.no_grad():
            bank.v.fill_(0.2)
            before = tg.token_logprobs(m, seqs, 1.0)
        opt = torch.optim.AdamW([bank.v], lr=1e-1, weight_decay=0.0)
        ro = rollouts(seqs, [1.0, -1, 0.5, -0.5, 2, -2, 1, -1], before)
        old_lp, _ = tg.policy_update(m, opt, ro, [1e-1] * M, hyper(), how(), 1.0)
        mask = scale.length_mask([len(c) for _, c in seqs], before.shape[1]).bool()
        assert torch.allclose(old_lp[mask], before[mask], atol=1e-5)  # not after the first step
        assert not torch.allclose(bank.v, torch.full_like(bank.v, 0.2))
        olds.append(old_lp)
    assert torch.allclose(olds[0], olds[1], atol=1e-5)


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_the_update_is_the_same_with_the_fast_pass_and_with_the_plain_one(mini_batches):
    """The default loss pass (harness/scale.py: shared prompts, G = 3) and token_logprobs give the
    same π_old, v and gradient norm."""
    seqs = grouped_sequences(n_groups=4, G=3)
    A = torch.randn(12, generator=torch.Generator().manual_seed(3))
    results = []
    for pass_ in (how(micro_batch=5, G=3), how(micro_batch=5, plain=True)):
        m = tiny_model("qwen2", vocab=300, layers=2)
        bank = tinylora.apply_tinylora(m, params=5)
        with torch.no_grad():
            sampler_lp = tg.token_logprobs(m, seqs, 1.0) - 0.1
        opt = torch.optim.AdamW([bank.v], lr=1e-2, weight_decay=0.0)
        old_lp, stats = tg.policy_update(m, opt, rollouts(seqs, A, sampler_lp),
                                         [1e-2] * mini_batches, hyper(), pass_, 1.0)
        results.append((old_lp, bank.v.detach().clone(), stats["grad_norm"]))
    (o1, v1, g1), (o2, v2, g2) = results
    mask = scale.length_mask([len(c) for _, c in seqs], o1.shape[1]).bool()
    assert torch.allclose(o1[mask], o2[mask], atol=1e-5) and torch.allclose(v1, v2, atol=1e-6)
    assert g1 == pytest.approx(g2, rel=1e-4)


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_an_update_on_real_rollouts_changes_v_and_nothing_else(smol_tok, mini_batches):
    m = tiny_model("qwen2", vocab=len(smol_tok), layers=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bank = tinylora.apply_tinylora(m, params=13)
    shots = task.load_task("arith", "test")[1]
    rows = task.load_task("arith", "test")[0][:2]
    prompts = [p for _, p in task.prompt_ids(smol_tok, rows, shots, 512)]
    torch.manual_seed(0)
    comps = rollout.generate_hf(m, smol_tok, prompts, 4, 8, 1.0, [smol_tok.eos_token_id])
    assert len(comps) == 8 and all(len(c["ids"]) == len(c["logprobs"]) for c in comps)
    seqs = [(prompts[i // 4], c["ids"]) for i, c in enumerate(comps)]
    ro = rollouts(seqs, tg.group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0]), 4),
                  sampler_logprobs(comps))
    opt = torch.optim.AdamW([bank.v], lr=1e-2, weight_decay=0.0)
    old_lp, stats = tg.policy_update(m, opt, ro, [1e-2] * mini_batches, hyper(), how(), 1.0)
    mask = ro.sampler_lp != 0  # HF's recorded log-probs (after the temperature) are the trainer's
    assert (old_lp - ro.sampler_lp)[mask].abs().max() < 1e-4
    assert bank.v.abs().min() > 0 and stats["grad_norm"] > 0
    tinylora.remove_tinylora(m)
    assert all(torch.equal(before[k], t) for k, t in m.state_dict().items())


# ---- the MATH recipe's two loss terms: a KL to the base and an entropy bonus -----------------

def test_low_var_kl_is_verls_k3_by_hand_with_its_clamps():
    ref = torch.tensor([0.0, math.log(2.0), -math.log(2.0), 30.0, -30.0])  # logp = 0
    k3 = tg.low_var_kl(torch.zeros(5), ref)
    # exp(r) − r − 1: 0; 2 − ln 2 − 1; 1/2 + ln 2 − 1; r clamped to 20: e^20 − 21, then to 10;
    # r clamped to −20: e^−20 + 19, then to 10
    want = [0.0, 1 - math.log(2), math.log(2) - 0.5, 10.0, 10.0]
    assert torch.allclose(k3, torch.tensor(want), atol=1e-6)
    # the ±20 clamp on δ is what keeps δ = +∞ (a token of probability 0 under π in fp32) finite:
    # unclamped, exp(∞) − ∞ is NaN
    assert tg.low_var_kl(torch.tensor([-math.inf]), torch.tensor([0.0])).item() == 10.0


def test_the_kl_to_the_base_and_its_gradient_are_zero_at_v_zero_and_not_after():
    """The reference is the model at v = 0 (ref_logprobs zeroes v, then puts it back): at v = 0
    the k3 term and its gradient vanish exactly; at another v both are positive, and the
    reference is still the base's log-probs."""
    m = tiny_model("qwen2", vocab=300, layers=2)
    bank = tinylora.apply_tinylora(m, params=5)
    seqs = grouped_sequences(n_groups=2, G=3)
    C = max(len(c) for _, c in seqs)
    w = tg.agg_weights(scale.length_mask([len(c) for _, c in seqs], C), "token-mean", 8)
    only_kl = hyper(kl_coef=1.0)
    with torch.no_grad():
        base = tg.token_logprobs(m, seqs, 1.0)
    for v in (0.0, 0.3):
        with torch.no_grad():
            bank.v.fill_(v)
        ref = tg.ref_logprobs(m, bank, seqs, C, how(G=3))
        assert torch.allclose(ref, base, atol=1e-5) and torch.all(bank.v == v)
        bank.v.grad = None
        ro = rollouts(seqs, torch.zeros(len(seqs)), tg.token_logprobs(m, seqs, 1.0).detach(), ref)
        _, sums = tg.minibatch_backward(m, ro, list(range(len(seqs))), None, w, only_kl, how(G=3))
        if v == 0.0:
            assert sums["kl"] == 0.0 and torch.all(bank.v.grad == 0)
        else:
            assert sums["kl"] > 0 and bank.v.grad.abs().max() > 0


@pytest.mark.parametrize("plain", [False, True])
def test_the_entropy_of_a_uniform_policy_is_log_V(plain):
    m = tiny_model("qwen2", vocab=300, layers=1)
    with torch.no_grad():
        m.get_output_embeddings().weight.zero_()  # every logit 0: π uniform over 300 tokens
    tinylora.apply_tinylora(m, params=1)
    seqs = grouped_sequences(n_groups=2, G=2)
    lp, H = tg.logprobs(m, seqs, how(G=1 if plain else 2, plain=plain, entropy=True))
    mask = scale.length_mask([len(c) for _, c in seqs], lp.shape[1]).bool()
    assert torch.allclose(H[mask], torch.full_like(H[mask], math.log(300)), atol=1e-5)
    assert torch.allclose(lp[mask], torch.full_like(lp[mask], -math.log(300)), atol=1e-5)


def test_the_whole_loss_gradient_equals_a_dense_fp64_reference():
    """PPO-clip with TIS, + 0.3·k3 to the base, − 0.2·entropy, token-mean, through the fast pass
    (shared prompts, micro-batches): the gradient on v equals the formulas' computed token by
    token from a dense fp64 forward."""
    m = tiny_model("qwen2", vocab=300, layers=2).double()
    bank = tinylora.apply_tinylora(m, params=5)
    seqs = grouped_sequences(n_groups=3, G=2)
    N, C, g = len(seqs), max(len(c) for _, c in seqs), torch.Generator().manual_seed(4)
    lengths = [len(c) for _, c in seqs]
    with torch.no_grad():
        bank.v.normal_(0, 0.05, generator=g)  # near the base: k3 under verl's clamp at 10
        ref = tg.ref_logprobs(m, bank, seqs, C, how(G=2)).double()
        old = tg.token_logprobs(m, seqs, 1.0) + 0.3 * torch.randn(N, C, generator=g).double()
    A, sampler = torch.randn(N, generator=g).double(), old - torch.randn(N, C, generator=g).double()
    loss_terms = hyper(kl_coef=0.3, entropy_coef=0.2)
    w = tg.agg_weights(scale.length_mask(lengths, C).double(), "token-mean", 8)
    ro = rollouts(seqs, A, sampler, ref)
    tg.minibatch_backward(m, ro, list(range(N)), old, w, loss_terms, how(micro_batch=4, G=2,
                                                                       entropy=True))
    got, bank.v.grad = bank.v.grad.clone(), None
    terms = []
    for i, (p, c) in enumerate(seqs):  # one dense forward per sequence, every term by hand
        logits = m(torch.tensor([p + c])).logits[0, len(p) - 1:-1].double()  # (len c, V)
        logp_all = logits.log_softmax(-1)
        for t, tok in enumerate(c):
            logp, H = logp_all[t, tok], -(logp_all[t].exp() * logp_all[t]).sum()
            ratio = torch.exp(logp - old[i, t])
            pg = -torch.minimum(ratio * A[i], ratio.clamp(0.8, 1.4) * A[i])
            tis = min(math.exp(old[i, t] - sampler[i, t]), 2.0)
            r = ref[i, t] - logp
            assert abs(r) < 20 and torch.exp(r) - r - 1 < 10  # inside verl's clamps
            terms.append(pg * tis + 0.3 * (torch.exp(r) - r - 1) - 0.2 * H)
    want, = torch.autograd.grad(sum(terms) / sum(lengths), bank.v)
    assert torch.allclose(got, want.float(), rtol=1e-4, atol=1e-6), (got, want)  # v is fp32


# ---- the command line, bad inputs, and an exact resume after kill -9 --------------------------

@pytest.mark.parametrize("argv,msg", [
    (["--params", "0"], "must be positive"),
    (["--batch-prompts", "5", "--mini-batches", "2"], "does not split"),
    (["--model", "/nope/m.gguf"], "model file not found"),
    (["--data", "/nope/d.jsonl"], "data file not found"),
    (["--u", "1"], "go together"),
    (["--model", "/nope/folder"], "cannot load model"),
    (["--temperature", "0"], "must be > 0"),
])
def test_a_bad_flag_is_refused_before_anything_is_written(tmp_path, argv, msg):
    with pytest.raises(ValueError, match=msg):
        tg.main([*argv, "--device", "cpu", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_bad_input_is_one_line_on_stderr_and_exit_code_2(tmp_path):
    p = cli("train_grpo.py", "--params", "0", "--out", str(tmp_path / "run"))
    assert p.returncode == 2 and p.stderr.strip() == "error: --params must be positive, got 0"


@pytest.mark.parametrize("content,msg", [
    (b"", "no rows"),
    (b'{"question": "q", "answer": "#### 3"}\nnot json\n', "line 2: not valid JSON"),
])
def test_a_bad_data_file_is_named_and_nothing_is_written(tiny_folder, tmp_path, content, msg):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    with pytest.raises(ValueError, match=f"{data}.*{msg}|{msg}.*{data}"):
        tg.main(["--model", tiny_folder, "--backend", "hf", "--data", str(data),
                 "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bad_adapter_flags_on_a_real_model_write_nothing(smol_folder, tmp_path):
    for argv, msg in [(["--params", "100000"], "nearest feasible"),
                      (["--targets", "q_proj,wq"], "not found")]:
        p = cli("train_grpo.py", "--preset", "cpu-demo", "--model", smol_folder, "--backend", "hf",
                *argv, "--out", str(tmp_path / "run"))
        assert p.returncode == 2 and msg in p.stderr, p.stderr[-500:]
        assert not (tmp_path / "run").exists()


@pytest.mark.slow  # three training processes, one killed: 30 s of the fast suite's 3 minutes
def test_resume_after_kill_9_and_a_torn_write_equals_the_uninterrupted_run(
        answer_folder, sevens_jsonl, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    p = cli("train_grpo.py", *tiny_run_args(answer_folder, sevens_jsonl, full))
    assert p.returncode == 0, p.stderr[-2000:]
    want = run_state(full)
    assert want[0]["v"].abs().sum() > 0 and len({r["reward"] for r in want[3]}) > 1, "no signal"
    # kill -9 while step 3 is in flight (or between step 2's log row and its checkpoint)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train_grpo.py",
                             *tiny_run_args(answer_folder, sevens_jsonl, part)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, t0 = part / "log.jsonl", time.time()
    while not (log.exists() and len(log.read_text().splitlines()) >= 2) and time.time() - t0 < 300:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(log.read_text().splitlines()) < 5, "the run finished before it could be killed"
    # a write torn by a kill leaves a temp file; the files themselves are only renamed into place
    (part / "checkpoint.safetensors.tmp999").write_bytes(b"\x00" * 20)
    (part / "adapter.safetensors.tmp999").write_bytes(b"torn")
    p = cli("train_grpo.py", "--resume", str(part))
    assert p.returncode == 0 and "resumed at step" in p.stdout, p.stderr[-2000:]
    got = run_state(part)
    for k in ("v", "exp_avg", "exp_avg_sq"):
        assert torch.allclose(got[0][k], want[0][k], atol=1e-6, rtol=1e-5), k
    assert got[1:3] == want[1:3] and got[3] == want[3]
    assert torch.allclose(got[4], want[4], atol=1e-6)
    assert not list(part.glob("*.tmp*"))  # stale temp files are cleared on resume
    p = cli("train_grpo.py", "--resume", str(part))  # after the end: only the adapter and plot
    assert p.returncode == 0 and run_state(part)[3] == want[3]
    assert (full / "reward.png").stat().st_size > 1000


def test_proj_seed_fixes_P_and_the_factors_and_seed_only_the_data_and_samples(
        answer_folder, sevens_jsonl, tmp_path):
    def one(name, *flags):  # P per module from --proj-seed (the fork's P ignores it)
        bank = tg.main(tiny_run_args(answer_folder, sevens_jsonl, tmp_path / name, steps=1)
                       + ["--projections", "independent", *flags])
        log = [json.loads(x) for x in open(tmp_path / name / "log.jsonl")]
        P = {n: L.P.clone() for n, L in bank.layers.items()}
        return tinylora.read_adapter(str(tmp_path / name / "adapter.safetensors"))[1], P, log

    meta, P, log = one("a", "--seed", "0")
    meta_s, P_s, log_s = one("b", "--seed", "1")
    meta_p, P_p, _ = one("c", "--seed", "0", "--proj-seed", "1")
    assert meta["seed"] == meta_s["seed"] == 0 and meta_p["seed"] == 1  # the adapter records it
    assert meta["fingerprint"] == meta_s["fingerprint"] != meta_p["fingerprint"]  # the sketch's
    assert all(torch.equal(P[n], P_s[n]) and not torch.equal(P[n], P_p[n]) for n in P)
    assert log[0]["reward"] != log_s[0]["reward"] or log[0]["len_mean"] != log_s[0]["len_mean"]
    with pytest.raises(ValueError, match=r"adapter plan differs.*'seed': \(0, 1\)"):
        tg.main(["--resume", str(tmp_path / "a"), "--proj-seed", "1", "--steps", "2"])
    with pytest.raises(ValueError, match=r"'projections': \('independent', 'fork'\)"):
        tg.main(["--resume", str(tmp_path / "a"), "--projections", "fork", "--steps", "2"])


def test_the_gpu_recipe_on_a_machine_without_a_gpu_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no GPU here.*--preset cpu-demo.*--device cpu"):
        config.trainer_args(["--params", "13"])
    assert config.trainer_args(["--preset", "cpu-demo"]).model != "Qwen/Qwen2.5-7B-Instruct"


def test_the_math_recipe_is_simplerls_settings_over_the_gsm8k_defaults(capsys):
    gsm8k, math_ = (config.trainer_args(["--device", "cpu", *extra])
                    for extra in ([], ["--recipe", "math"]))
    want = dict(data="hkust-nlp/SimpleRL-Zoo-Data", prompt="qwen-boxed", reward="math",
                batch_prompts=256, group_size=8, mini_batches=1, eps_low=0.2, eps_high=0.2,
                max_prompt=1024, max_new_tokens=3072, tis_cap=2.0, kl_coef=0.001,
                entropy_coef=0.001, temperature=1.0, epochs=3, lr=gsm8k.lr, warmup=0.0)
    assert {k: getattr(math_, k) for k in want} == want
    assert (gsm8k.kl_coef, gsm8k.entropy_coef, gsm8k.prompt) == (0.0, 0.0, "gsm8k")
    fork = config.trainer_args(["--device", "cpu", "--recipe", "math", "--epochs", "12"])
    assert fork.epochs == 12  # the fork's script
    with pytest.raises(SystemExit):
        config.trainer_args(["--help"])
    assert "math: data=hkust-nlp/SimpleRL-Zoo-Data prompt=qwen-boxed" in capsys.readouterr().out


@pytest.mark.slow
def test_the_cpu_math_preset_trains_with_kl_and_entropy_and_scores_the_math_reward(
        smol_folder, tmp_path):
    p = cli("train_grpo.py", "--preset", "cpu-math", "--model", smol_folder, "--steps", "1",
            "--batch-prompts", "2", "--group-size", "2", "--max-new-tokens", "32", "--eval-n", "4",
            "--out", str(tmp_path / "run"))  # one small step: CI's time
    assert p.returncode == 0, p.stderr[-2000:]
    log = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl")]
    steps = [r for r in log if r["kind"] == "train"]
    assert len(steps) == 1 and steps[0]["kl"] >= 0 and steps[0]["entropy"] > 0
    evals = [r for r in log if r["kind"] == "eval"]
    assert [r["metric"] for r in evals] == ["math", "math"] and len(evals[0]["right"]) == 4
    assert (tmp_path / "run" / "reward.png").is_file()
    assert "preset cpu-math over the defaults" in p.stdout and "held-out math" in p.stdout
