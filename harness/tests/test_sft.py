"""Specifications of harness/sft.py: the demonstrations, and the update's loss and gradient against
a per-sequence reference. CPU only, no network."""
import pytest
import torch

import task
import tinylora
import train_grpo as tg
from harness import sft
from harness.tests.fixtures import tiny_model


def test_demos_are_the_gold_solution_then_eos(smol_tok):
    rows, shots = task.load_task("arith", "train")
    batch = task.prompt_ids(smol_tok, rows[:3], shots, 512)
    seqs = sft.demos(smol_tok, batch, smol_tok.eos_token_id)
    for (row, p), (p2, c) in zip(batch, seqs):
        assert p2 == p and c[-1] == smol_tok.eos_token_id
        assert smol_tok.decode(c[:-1]) == row["solution"]
        text = smol_tok.decode(c[:-1])
        assert all(task.reward(text, row, True, k) == 1 for k in ("paper", "strict"))


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
    how = tg.Pass(temperature=1.0, micro_batch=micro_batch, micro_tokens=0, G=1, plain=False,
                  entropy=False)
    loss, _ = sft.sft_update(m, opt, seqs, [0.0], how, grad_clip=1e9)  # no clipping
    assert loss == pytest.approx((nll / n).item(), rel=1e-5)
    assert torch.allclose(bank.v.grad, ref, rtol=1e-4, atol=1e-7), (bank.v.grad, ref)
