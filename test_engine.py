"""Tests of engine.py: EOS cutting, the HF sampler's log-probs, the vLLM weight push, checkpoints.
CPU only, no network; the vLLM tests are marked slow (run with --runslow, as CI does)."""
import os

import pytest
import torch

import engine
import task
import tinylora
import train_grpo as G
from conftest import tiny_model, vllm_or_skip


def test_cut_at_eos_drops_everything_after_the_first_eos():
    assert engine.cut_at_eos([4, 5, 2, 7, 2], [.1, .2, .3, .4, .5], {2}) == ([4, 5, 2], [.1, .2, .3], True)
    assert engine.cut_at_eos([4, 5], [.1, .2], {2}) == ([4, 5], [.1, .2], False)


# ---- vLLM: sync and log-prob agreement ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llm(tiny_folder):
    vllm_or_skip()
    return engine.make_vllm(tiny_folder, "float32", 512, 0)


@pytest.mark.slow
@pytest.mark.parametrize("targets", [tinylora.DEFAULT_TARGETS, ("q_proj", "up_proj")])
def test_vllm_sync_matches_trainer_logprobs(tiny_llm, tiny_folder, smol_tok, targets):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    bank = tinylora.apply_tinylora(m, params=4, targets=targets)
    with torch.no_grad():
        bank.v.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    prompts = [task.prompt_ids(smol_tok, [r], [], 512)[0][1] for r in task.arith_rows("test")[:3]]
    eos = [smol_tok.eos_token_id]

    def gap():
        torch.manual_seed(0)
        comps = engine.generate_vllm(tiny_llm, smol_tok, prompts, 2, 12, 1.0, eos)
        seqs = [(prompts[i // 2], c["ids"]) for i, c in enumerate(comps)]
        with torch.no_grad():
            lp, mask = G.token_logprobs(m, seqs, 1.0), engine.completion_mask([len(c) for _, c in seqs], max(len(c) for _, c in seqs))
        roll = engine.padded_logprobs(comps)
        return ((lp - roll).abs() * mask).max().item()

    stale = gap()  # vLLM still has W0 (or the previous test's weights): far from the adapter
    n = engine.sync_weights(tiny_llm, m, bank)
    assert n >= len(bank.layers)
    assert gap() < 1e-3 < stale
    with torch.no_grad():  # and back to the base: v = 0 pushes exactly W0
        bank.v.zero_()
    engine.sync_weights(tiny_llm, m, bank)
    assert gap() < 1e-3


