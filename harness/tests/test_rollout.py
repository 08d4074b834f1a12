"""Specifications of rollout.py: completions cut at the EOS, seeded Gumbel sampling, the weights
pushed to the generator (W0 + ΔW), and vLLM's log-probs against the trainer's after a push (slow).
CPU only, no network."""
import weakref

import pytest
import torch

import rollout
import task
import tinylora
import train_grpo as tg
from harness import engine, scale
from harness.data import arith_rows
from harness.run import sampler_logprobs
from harness.tests.fixtures import tiny_model, vllm_or_skip


class Tok:  # decodes ids as text, for completion()
    @staticmethod
    def decode(ids, skip_special_tokens=True):  # noqa: ARG004
        return " ".join(map(str, ids))


def test_a_completion_ends_at_its_first_eos():
    c = rollout.completion(Tok, [4, 5, 2, 7, 2], [.1, .2, .3, .4, .5], {2})
    assert (c["ids"], c["logprobs"], c["finished"], c["text"]) == ([4, 5, 2], [.1, .2, .3], True,
                                                                   "4 5 2")
    c = rollout.completion(Tok, [4, 5], [.1, .2], {2})
    assert (c["ids"], c["finished"]) == ([4, 5], False)
    assert rollout.completion(Tok, [4, 5], [.1, .2], {2}, finished=True)["finished"]


def test_seeded_gumbel_sampling_draws_from_the_softmax_and_ignores_the_batch():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]]).repeat(4000, 1)  # (4000, 4)
    rec = rollout.SamplerLogprobs(0.7, seeds=list(range(4000)))
    picks = rec(torch.zeros(4000, 1, dtype=torch.long), logits).argmax(1)
    freq = torch.bincount(picks, minlength=4).float() / 4000
    p = (logits[0] / 0.7).softmax(0)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / 4000).sqrt().max()  # 4 sigma
    assert torch.allclose(rec.prev[0], p.log())  # the recorded log π is the unperturbed one
    alone = rollout.SamplerLogprobs(0.7, seeds=[17])(torch.zeros(1, 1, dtype=torch.long),
                                                      logits[:1]).argmax(1)
    assert alone.item() == picks[17].item()  # row 17's draw does not depend on the other rows


class PadTok(Tok):
    pad_token_id = 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_seeded_hf_sample_draws_the_same_tokens_alone_or_in_a_batch(arch):
    """rollout.py's claim, exactly: the noise is the sample's own, so the draw does not depend on
    the batch; the logits under it may move in the last bits with the batch's padding."""
    m = tiny_model(arch, vocab=100, layers=2)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    seeds = rollout.row_seeds(7, range(4), 3)
    batch = rollout.generate_hf(m, PadTok, prompts, 3, 12, 1.0, [2], seeds=seeds)
    for i, p in enumerate(prompts):
        alone = rollout.generate_hf(m, PadTok, [p], 3, 12, 1.0, [2], seeds=seeds[3 * i:3 * i + 3])
        for a, b in zip(alone, batch[3 * i:3 * i + 3]):
            assert a["ids"] == b["ids"]
            assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_push_streams_W0_plus_delta_W_with_every_fused_sibling_and_bias(arch):
    """What vLLM receives: every adapted weight is W0 + U Σ R Vᵀ (fp64 reference), every other
    linear of an adapted module's parent is its W0, biases included; v = 0 pushes W0 exactly."""
    m = tiny_model(arch, vocab=100, layers=2)
    bank = tinylora.apply_tinylora(m, params=3, targets=("q_proj", "up_proj", "down_proj"))
    with torch.no_grad():
        bank.v.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    pushed = dict(rollout.merged_stream(m, bank))
    attn = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    mlp = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    biases = [f"{n}.bias" for n in attn if arch == "qwen2" and not n.endswith("o_proj")]
    assert set(pushed) == {f"{n}.weight" for n in attn + mlp} | set(biases)  # whole fused groups
    for name, L in bank.layers.items():
        v, P = bank.v[L.group].detach().double(), L.P.double()
        R = sum(v[i] * P[i] for i in range(len(v)))
        ref = L.base.weight.double() + L.U.double() @ torch.diag(L.S.double()) @ R @ L.V.double().T
        assert torch.allclose(pushed[f"{name}.weight"].double(), ref, atol=1e-6)
    with torch.no_grad():
        bank.v.zero_()
    for name, t in rollout.merged_stream(m, bank):
        module = m.get_submodule(name.rpartition(".")[0])
        W0 = getattr(getattr(module, "base", module), name.rpartition(".")[2])
        assert torch.equal(t, W0), name


# ---- vLLM: sync and log-prob agreement -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llm(tiny_folder):
    vllm_or_skip()
    return engine.make_vllm(tiny_folder, "float32", 512, 0)


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
    prompts = [task.prompt_ids(smol_tok, [r], [], 512)[0][1] for r in arith_rows("test")[:3]]
    eos = [smol_tok.eos_token_id]

    def gap():
        torch.manual_seed(0)
        comps = rollout.generate_vllm(tiny_llm, smol_tok, prompts, 2, 12, T, eos)
        seqs = [(prompts[i // 2], c["ids"]) for i, c in enumerate(comps)]
        with torch.no_grad():
            lp = tg.token_logprobs(m, seqs, T)  # (b, c)
        mask = scale.length_mask([len(c) for _, c in seqs], lp.shape[1])
        sampler_lp = sampler_logprobs(comps)
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
    generator = rollout.make_generator("vllm", m, smol_tok, bank, tiny_folder, str(tmp_path), 512,
                                       0, sync="lora")
    prompts = [task.prompt_ids(smol_tok, [r], [], 512)[0][1] for r in arith_rows("test")[:3]]

    def gap():
        comps = generator.generate(prompts, 2, 12, 1.0, seed=0)
        seqs = [(prompts[i // 2], c["ids"]) for i, c in enumerate(comps)]
        with torch.no_grad():
            lp = tg.token_logprobs(m, seqs, 1.0)
        mask = scale.length_mask([len(c) for _, c in seqs], lp.shape[1])
        return ((lp - sampler_logprobs(comps)).abs() * mask).max().item()

    generator.push(bank)  # v = 0: a zero LoRA
    assert gap() < 1e-3
    with torch.no_grad():
        bank.v.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    stale = gap()  # vLLM still holds the zero LoRA
    generator.push(bank)
    assert gap() < 1e-3 < stale


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
