"""Tests of rollout.py: EOS cutting, the sampler's log-probs, the vLLM weight push (merged and
LoRA) against the trainer's log-probs. CPU only, no network; the vLLM tests are marked slow."""
import weakref

import pytest
import torch

import task
import tinylora
import train_grpo as tg
import rollout
from harness import flags
from harness.tests.fixtures import vllm_or_skip

HERE = flags.ROOT


def test_cut_at_eos_drops_everything_after_the_first_eos():
    cut = rollout.cut_at_eos([4, 5, 2, 7, 2], [.1, .2, .3, .4, .5], {2})
    assert cut == ([4, 5, 2], [.1, .2, .3], True)
    assert rollout.cut_at_eos([4, 5], [.1, .2], {2}) == ([4, 5], [.1, .2], False)


# ---- vLLM: sync and log-prob agreement -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llm(tiny_folder):
    vllm_or_skip()
    return rollout.make_vllm(tiny_folder, "float32", 512, 0)


@pytest.mark.slow
@pytest.mark.parametrize("targets,T", [(tinylora.DEFAULT_TARGETS, 1.0),
                                       (("q_proj", "up_proj"), 1.0),
                                       (tinylora.DEFAULT_TARGETS, 0.7)])
def test_vllm_sync_matches_trainer_logprobs(tiny_llm, tiny_folder, smol_tok, targets, T):
    """The sampler's log-probs equal the trainer's, at T = 1 and at another temperature (vLLM
    returns them after the temperature only with logprobs_mode="processed_logprobs")."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    bank = tinylora.apply_tinylora(m, params=4, targets=targets)
    with torch.no_grad():
        bank.v.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    prompts = [task.prompt_ids(smol_tok, [r], [], 512)[0][1] for r in task.arith_rows("test")[:3]]
    eos = [smol_tok.eos_token_id]

    def gap():
        torch.manual_seed(0)
        comps = rollout.generate_vllm(tiny_llm, smol_tok, prompts, 2, 12, T, eos)
        seqs = [(prompts[i // 2], c["ids"]) for i, c in enumerate(comps)]
        with torch.no_grad():
            lp = tg.token_logprobs(m, seqs, T)  # (b, c)
        mask = tg.completion_mask([len(c) for _, c in seqs], lp.shape[1])
        sampler_lp = tg.padded_logprobs(comps)
        return ((lp - sampler_lp).abs() * mask).max().item()

    stale = gap()  # vLLM still has W0 (or the previous test's weights): far from the adapter
    live, peak, total = [], [0], [0]
    alive = lambda: sum(t().nbytes for t in live if t() is not None)  # noqa: E731

    # the bytes of pushed tensors still held anywhere when the next one is made
    def watched(stream):
        for name, t in stream:
            peak[0], total[0] = max(peak[0], alive() + t.nbytes), total[0] + t.nbytes
            live.append(weakref.ref(t))
            yield name, t
    tiny_llm.collective_rpc("reload_weights",
                            kwargs=dict(weights_iterator=watched(rollout.merged_stream(m, bank))))
    tiny_llm.reset_prefix_cache()
    assert gap() < 1e-3 < stale
    layer = max(sum(p.nbytes for p in L.parameters() if p.dim() == 2) for L in m.model.layers)
    # never more than one layer at once
    assert len(live) >= len(bank.layers) and peak[0] <= layer, (peak[0], layer)
    print(f"streamed push: at most {peak[0]:,} bytes held at once; one layer {layer:,}; "
          f"the whole push {total[0]:,}")
    with torch.no_grad():  # and back to the base: v = 0 pushes exactly W0
        bank.v.zero_()
    rollout.sync_weights(tiny_llm, m, bank)
    assert gap() < 1e-3




@pytest.mark.slow
def test_vllm_lora_push_matches_trainer_logprobs(tiny_folder, smol_tok, tmp_path):
    vllm_or_skip()
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    bank = tinylora.apply_tinylora(m, params=4)
    generator = rollout.make_generator("vllm", m, smol_tok, bank, tiny_folder, str(tmp_path),
                                 torch.float32, 512, 0, 0.4, "lora")
    prompts = [task.prompt_ids(smol_tok, [r], [], 512)[0][1] for r in task.arith_rows("test")[:3]]

    def gap():
        comps = generator.generate(prompts, 2, 12, 1.0, seed=0)
        seqs = [(prompts[i // 2], c["ids"]) for i, c in enumerate(comps)]
        with torch.no_grad():
            lp = tg.token_logprobs(m, seqs, 1.0)
        mask = tg.completion_mask([len(c) for _, c in seqs], lp.shape[1])
        return ((lp - tg.padded_logprobs(comps)).abs() * mask).max().item()

    generator.push(bank)  # v = 0: a zero LoRA
    assert gap() < 1e-3
    with torch.no_grad():
        bank.v.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    stale = gap()  # vLLM still holds the zero LoRA
    generator.push(bank)
    assert gap() < 1e-3 < stale


def test_only_vllms_noise_is_filtered():
    import logging

    from harness.models import VllmNoise
    f = VllmNoise()

    def rec(name, msg, *a):
        return logging.LogRecord(name, logging.WARNING, "f", 1, msg, a, None)
    push, cpu = "vllm.model_executor.model_loader.reload.layerwise", "vllm.v1.worker.cpu_worker"
    assert not f.filter(rec(push, "Following weights were not loaded from checkpoint: %s", {"a"}))
    assert not f.filter(rec(push, "%s: Failed to load weights", "RMSNorm"))
    assert not f.filter(rec(cpu, "%s is not found in LD_PRELOAD. For best performance", "x"))
    assert not f.filter(rec(cpu, "CPU backend doesn't allow to use `torch.set_num_threads` after"))
    assert f.filter(rec(push, "Allocating %.1f MB of device memory to buffers", 3.0))
    assert f.filter(rec(cpu, "KV cache is full"))
    assert f.filter(rec("vllm.other", "Following weights were not loaded from checkpoint: %s"))


def test_vllm_requests_carry_one_seed_per_prompt_when_seeds_are_given():
    """On CUDA each prompt is its own seeded request (vLLM's GPU runner ignores torch's seed); on
    CPU none is."""
    pytest.importorskip("vllm")

    # stands in for vllm.LLM to read the requests it is handed (no engine needed for this)
    class Recorder:
        def generate(self, prompts, sp, **kw):
            self.sp = sp
            return []

    llm = Recorder()
    rollout.generate_vllm(llm, None, [[1, 2], [3]], 4, 5, 1.0, [0],
                          seeds=rollout.row_seeds(7, [2, 5], 1))
    assert [s.seed for s in llm.sp] == rollout.row_seeds(7, [2, 5], 1)
    assert all(s.n == 4 for s in llm.sp)
    rollout.generate_vllm(llm, None, [[1, 2], [3]], 4, 5, 1.0, [0])
    assert llm.sp.seed is None
