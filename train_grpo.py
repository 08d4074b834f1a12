"""
GRPO with TinyLoRA: train a few scalars with an exact-match reward, rollouts on the merged weights.

    python train_grpo.py --params 13                      # the paper's recipe (GPU, Qwen2.5-7B)
    python train_grpo.py --params 13 --preset cpu-demo    # a 2-core CPU: SmolLM2-135M, arithmetic
    python train_grpo.py --resume runs/cpu-demo            # continue exactly where it stopped
    torchrun --nproc-per-node 8 train_grpo.py --params 13  # data parallel, the same update

One step: data -> rollout (on W0 + ΔW) -> reward -> group advantages -> PPO-clip loss through the
unmerged adapter (only v has gradients) -> AdamW step(s) -> push W0 + ΔW to the generator -> log.
Read top to bottom: config, loss, log-probs, update, loop; task.py holds the data and reward,
rollout.py the generator, harness/ the machinery (setup, checkpoints, torchrun).

Chosen where the paper is silent (defaults: the first author's verl GSM8K recipe, paper §5.1):
 1. π_old is the trainer's own forward before the first update of a rollout batch; truncated
    importance sampling weighs each token's loss by min(π_old/π_sampler, 2) (the sampler's π).
 2. A = (r − mean_group)/(std_group + ε), std unbiased as in verl; a constant group gives A = 0.
 3. Data order: a permutation per epoch from (seed, epoch); each completion is sampled from (seed,
    step, its place in the batch). A checkpoint needs only v, the Adam moments and the step.
 4. lr 2e-3: the author's code scales ΔW by lora_alpha/r = 16 and uses R/√u, so his swept 1e-5 …
    2e-4 are 1.6e-4 … 3.2e-3 here; an informed guess, not re-swept on a GPU (the CPU demo's 3e-2 is
    the CPU search's choice on its validation split).
 5. The loss pass runs each prompt once per group (the prefix all prompts share once) and its G
    completions on its KV cache, in runs of similar length: the same log-probs and gradient (tested)
    for a fraction of the work (--no-shared-prompt to compare).
"""
import functools
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute
from tqdm import tqdm
from transformers import DynamicCache

import eval as evaluation
import task
import tinylora
from harness import checkpoint, dist, flags, memory, metrics
from harness.batches import (completion_mask, left_pad, length_runs, micro_batches,
                             padded_logprobs)
from harness.setup import setup


# ---- Config: the shared flags (harness/flags.py) and the optimisation; defaults = the paper's
# recipe
def parser():
    ap = flags.new_parser(__doc__.split("\n")[1])
    for add in (flags.add_model, flags.add_adapter, flags.add_data, flags.add_generator):
        add(ap)
    g = ap.add_argument_group("rollout")
    g.add_argument("--reward", default="paper", choices=list(task.REWARDS),
                   help="paper: verl's GSM8K rule (the paper's); strict: stopped, equal as numbers")
    g.add_argument("--batch-prompts", type=int, default=64, help="prompts per rollout batch")
    g.add_argument("--group-size", type=int, default=4, help="samples per prompt (G)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--sync", default="merged", choices=["merged", "lora"],
                   help="how vLLM gets ΔW: merged W0 + ΔW (the author's), or the exact rank-r LoRA")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--steps", type=int, default=None, help="rollout steps (default: --epochs)")
    g.add_argument("--mini-batches", type=int, default=2, help="optimizer steps per rollout batch")
    g.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    g.add_argument("--micro-tokens", type=int, default=0, help="cap a micro-batch's tokens (0: no)")
    g.add_argument("--no-shared-prompt", action="store_true",
                   help="recompute each prompt for every sample (slower, same result)")
    g.add_argument("--grad-checkpointing", default="auto", choices=["auto", "on", "off"],
                   help="recompute each layer in backward (memory for time); auto: on with CUDA")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--warmup", type=float, default=0.05, help="fraction of optimizer steps")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--eps-low", type=float, default=0.2)
    g.add_argument("--eps-high", type=float, default=0.4)
    g.add_argument("--tis-cap", type=float, default=2.0)
    g.add_argument("--loss-agg", default="token-mean",
                   choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    flags.add_run(ap)
    g = ap.add_argument_group("this run")
    g.add_argument("--preset", default=None, choices=sorted(flags.PRESETS))
    g.add_argument("--out", default="runs/gsm8k")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    g.add_argument("--eval-n", type=int, default=0,
                   help="held-out problems scored greedily before and after (0 = off)")
    g.add_argument("--sample-every", type=int, default=5, help="print a sample every k steps")
    g.add_argument("--tensor-parallel", type=int, default=1, help="GPUs per vLLM engine (torchrun)")
    return ap


def get_args(argv=None):
    return flags.trainer_args(parser(), argv)


# ---- Loss: pure functions on tensors -----------------------------------------------------------
def group_advantages(r, G, eps=1e-6):
    """A = (r − mean_group)/(std_group + ε). r (B·G,) grouped consecutively -> (B·G,)."""
    g = r.view(-1, G)
    if G == 1:
        return r * 0
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1)


def agg_weights(mask, mode, max_new, n_tokens=None, n_seqs=None):
    """Per-token weights whose sum with a per-token loss gives the aggregate. mask (B, T) float;
    n_tokens, n_seqs: the mini-batch's totals over all ranks (default: this mask's).

    token-mean: Σ/Σmask (verl, paper) · seq-mean-token-mean: mean over sequences of per-sequence
    means (original GRPO; length-biased) · seq-mean-token-sum-norm: Σ/(B·max_new) (Dr. GRPO)."""
    n_tokens = mask.sum().item() if n_tokens is None else n_tokens
    n_seqs = mask.shape[0] if n_seqs is None else n_seqs
    if mode == "token-mean":
        return mask / max(n_tokens, 1)
    if mode == "seq-mean-token-mean":
        return mask / mask.sum(1, keepdim=True).clamp_min(1) / n_seqs
    if mode == "seq-mean-token-sum-norm":
        return mask / (n_seqs * max_new)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def tis_weight(old_lp, sampler_lp, cap):
    """Truncated importance sampling: min(π_old/π_sampler, cap), per token, no gradient."""
    return torch.exp(old_lp - sampler_lp).clamp(max=cap).detach()


def ppo_clip_loss(logp, old_lp, A, eps_low, eps_high):
    """Per-token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), ρ = π/π_old. logp, old_lp (B, T); A (B,)."""
    rho = torch.exp(logp - old_lp)
    A = A[:, None]
    return -torch.minimum(rho * A, rho.clamp(1 - eps_low, 1 + eps_high) * A), rho


def grpo_loss(logp, old_lp, sampler_lp, A, w, mask, eps_low, eps_high, tis_cap):
    """Σ w·TIS·PPO-clip over tokens, and how many tokens the clip cut off below and above.
    logp (b, c) with grad; old_lp, sampler_lp (b, c); A (b,); w, mask (b, c)."""
    pg, rho = ppo_clip_loss(logp, old_lp, A, eps_low, eps_high)
    loss = (pg * tis_weight(old_lp, sampler_lp, tis_cap) * w).sum()
    clip_low = ((rho < 1 - eps_low) & (A[:, None] < 0) & mask.bool()).sum().item()
    clip_high = ((rho > 1 + eps_high) & (A[:, None] > 0) & mask.bool()).sum().item()
    return loss, clip_low, clip_high


# ---- Log-probs through the adapter: the shared-prompt pass, the chunked lm-head ----------------
def head_chunk(b, vocab, bound=memory.HEAD_CHUNK_BYTES):
    """Time steps per lm-head chunk: (b, chunk, vocab) fp32 logits within `bound` bytes, at least
    1."""
    return max(1, bound // (b * vocab * 4))


def head_logprobs(model, h, y, temperature, chunk=None):
    """log π(y) from hidden states h (b, c, H) that predict y (b, c). The vocabulary projection is
    recomputed in backward per time chunk, so the (b, c, vocab) logits never exist at once."""
    head = model.get_output_embeddings()
    chunk = chunk or head_chunk(h.shape[0], head.weight.shape[0])

    def lp(hc, yc):
        return (head(hc).float() / temperature).log_softmax(-1).gather(-1, yc[..., None])[..., 0]

    return torch.cat([recompute(lp, h[:, s:s + chunk], y[:, s:s + chunk], use_reentrant=False)
                      for s in range(0, y.shape[1], chunk)], 1)


def token_logprobs(model, seqs, temperature, G=1):
    """log π of every completion token through the adapter, with grad: (b, c) right-padded.
    seqs: (prompt ids, completion ids). G = 1: one pass over prompt + completion (left-padded). G >
    1: groups of G share a prompt, which runs once (with grad: v changes its keys and values too),
    its prefix common to all prompts once for all; its G completions run on its KV cache, in runs of
    similar lengths: (Lp + G·C)/(G·(Lp + C)) of the work, less the padding."""
    dev = next(model.parameters()).device
    Lp, C = max(len(p) for p, _ in seqs), max(len(c) for _, c in seqs)
    y = torch.tensor([c + [0] * (C - len(c)) for _, c in seqs], device=dev)  # (b, C) completion ids
    cmask = completion_mask([len(c) for _, c in seqs], C).long().to(dev)  # (b, C)
    if G == 1:
        ids, mask = left_pad([p + c + [0] * (C - len(c)) for p, c in seqs], Lp + C)
        ids, mask = ids.to(dev), mask.to(dev)
        mask[:, Lp:] = cmask
        pos = (mask.cumsum(1) - 1).clamp_min(0)  # position ids that skip the left padding
        h = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        return head_logprobs(model, h[:, Lp - 1:Lp + C - 1], y, temperature)
    if model.training and model.is_gradient_checkpointing:
        raise ValueError("the shared-prompt pass needs the KV cache; checkpointed layers drop it")
    prompts = [seqs[i][0] for i in range(0, len(seqs), G)]
    if any(seqs[i][0] != prompts[i // G] for i in range(len(seqs))):
        raise ValueError(f"token_logprobs(G={G}): sequences of a group must share a prompt")
    kv, pmask, last = prompt_pass(model, prompts, dev)  # (g, heads, Lp, d) per layer, (g, Lp)
    parts, lps = length_runs([len(c) for _, c in seqs]), []
    for part in parts:  # completions of similar lengths, each padded only to its run's longest
        rows, Cr = torch.tensor(part, device=dev) // G, max(len(seqs[i][1]) for i in part)
        cache = DynamicCache([(k[rows], v[rows]) for k, v in kv])  # each sample's prompt
        pos = pmask.sum(1)[rows, None] + torch.arange(Cr, device=dev)  # (n, Cr)
        mask = torch.cat([pmask[rows], cmask[part, :Cr]], 1)  # (n, Lp + Cr)
        h = model.base_model(input_ids=y[part, :Cr], attention_mask=mask, position_ids=pos,
                             past_key_values=cache).last_hidden_state  # (n, Cr, H)
        h = torch.cat([last[rows], h[:, :Cr - 1]], 1)  # h predicts y
        lps.append(F.pad(head_logprobs(model, h, y[part, :Cr], temperature), (0, C - Cr)))
    order = torch.tensor([i for part in parts for i in part], device=dev)
    return torch.cat(lps)[torch.argsort(order)]  # (b, C), back in the order of seqs


def prompt_pass(model, prompts, dev):
    """The prompts' forward with grad, for their completions to run on: per-layer keys and values
    (g, heads, Lp, d), the mask over them (g, Lp) and the last prompt token's state (g, 1, H). The
    prefix every prompt shares (system prompt, shots) runs once, its cache repeated g times."""
    shared = len(os.path.commonprefix(prompts)) if len(prompts) > 1 else 0
    Lc, cache = min(shared, min(len(p) for p in prompts) - 1), None  # ≥ 1 token of each left
    if Lc > 0:
        pre = model.base_model(input_ids=torch.tensor([prompts[0][:Lc]], device=dev),
                               use_cache=True)
        one = torch.zeros(len(prompts), dtype=torch.long, device=dev)
        cache = DynamicCache([(k[one], v[one]) for k, v, *_ in pre.past_key_values])
    rest = [p[Lc:] for p in prompts]
    ids, smask = (t.to(dev) for t in left_pad(rest, max(len(p) for p in rest)))
    mask = torch.cat([smask.new_ones(len(prompts), Lc), smask], 1)  # (g, Lc + Ls)
    pos = (mask.cumsum(1) - 1).clamp_min(0)[:, Lc:]  # positions that skip the padding
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                           past_key_values=cache, use_cache=True)
    kv = [(k, v) for k, v, *_ in out.past_key_values]
    return kv, mask, out.last_hidden_state[:, -1:]


def loss_passes(model, seqs, idx, temperature, micro_batch, G=1, max_tokens=0):
    """Yield (positions in idx, log π (b, c) with grad) micro-batch by micro-batch over
    seqs[idx]."""
    lengths = [(len(seqs[i][0]), len(seqs[i][1])) for i in idx]
    with memory.loss_mode(model):
        for mb in micro_batches(lengths, micro_batch, G, max_tokens):
            yield mb, token_logprobs(model, [seqs[idx[j]] for j in mb], temperature, G)


def step_v(opt, bank, lr, grad_clip):
    """One AdamW step on v, its gradient summed over ranks and clipped; returns the norm."""
    for g in opt.param_groups:
        g["lr"] = lr
    dist.all_sum(bank.v.grad)
    norm = torch.nn.utils.clip_grad_norm_([bank.v], grad_clip).item()
    opt.step()
    return norm


# ---- The update: π_old, then one AdamW step per mini-batch of whole groups ----------------------
@torch.no_grad()
def old_logprobs(model, seqs, C, temperature, micro_batch, G=1, max_tokens=0):
    """π_old (N, C): the current policy's log-probs, before any update of this rollout batch."""
    old_lp = torch.zeros(len(seqs), C)
    lengths = [(len(p), len(c)) for p, c in seqs]
    for mb in micro_batches(lengths, micro_batch, G, max_tokens):
        lp = token_logprobs(model, [seqs[i] for i in mb], temperature, G)
        old_lp[mb, :lp.shape[1]] = lp.cpu()
    return old_lp


def accumulate_grad(model, seqs, idx, old_lp, sampler_lp, A, w, mask, micro_batch, temperature,
                    eps_low, eps_high, tis_cap, fill_old=False, G=1, max_tokens=0):
    """Backward of one mini-batch's loss Σ w·ℓ over seqs[idx] (whole groups), micro-batch by
    micro-batch; w, mask (len(idx), C) align with idx. fill_old: this pass is π_old (one
    mini-batch), so old_lp[idx] is set from it first. Returns the tokens clipped below and above."""
    clip_low = clip_high = 0
    for mb, lp in loss_passes(model, seqs, idx, temperature, micro_batch, G, max_tokens):
        ii, c, dev = [idx[j] for j in mb], lp.shape[1], lp.device  # ii: indices into seqs
        if fill_old:
            old_lp[ii, :c] = lp.detach().cpu()
        loss, lo, hi = grpo_loss(lp, old_lp[ii, :c].to(dev), sampler_lp[ii, :c].to(dev),
                                 A[ii].to(dev), w[mb, :c].to(dev), mask[mb, :c].to(dev), eps_low,
                                 eps_high, tis_cap)
        loss.backward()
        clip_low, clip_high = clip_low + lo, clip_high + hi
    return clip_low, clip_high


def policy_update(model, bank, opt, seqs, A, sampler_lp, lrs, micro_batch, temperature, eps_low,
                  eps_high, tis_cap, loss_agg, max_new, grad_clip, G=1, max_tokens=0):
    """One rollout batch -> len(lrs) AdamW steps on v. seqs: (prompt, completion ids) per sample,
    G per group; A (N,); sampler_lp (N, C). Returns π_old (N, C) and the update's statistics. Under
    torchrun seqs are this rank's share: weights count every rank's tokens; v's gradient is summed.
    """
    N, C, M = len(seqs), sampler_lp.shape[1], len(lrs)
    mask = completion_mask([len(c) for _, c in seqs], C)  # (N, C)
    old_lp = (old_logprobs(model, seqs, C, temperature, micro_batch, G, max_tokens) if M > 1
              else torch.zeros(N, C))
    stats = dict(clip_low=0, clip_high=0, grad_norm=0.0)
    for m, lr in enumerate(lrs):
        idx = list(range(m * N // M, (m + 1) * N // M))  # the mini-batch, whole groups
        mini = mask[idx]  # (len(idx), C)
        n_tokens, n_seqs = dist.all_sum(mini.sum().item()), dist.all_sum(len(idx))
        w = agg_weights(mini, loss_agg, max_new, n_tokens, n_seqs)  # (len(idx), C)
        opt.zero_grad(set_to_none=True)
        lo, hi = accumulate_grad(model, seqs, idx, old_lp, sampler_lp, A, w, mini, micro_batch,
                                 temperature, eps_low, eps_high, tis_cap, M == 1, G, max_tokens)
        stats["clip_low"] += dist.all_sum(lo)
        stats["clip_high"] += dist.all_sum(hi)
        stats["grad_norm"] = step_v(opt, bank, lr, grad_clip)
    return old_lp, stats


def update_flags(args, model):
    shared = not (args.no_shared_prompt or model.is_gradient_checkpointing)
    return dict(micro_batch=args.micro_batch, temperature=args.temperature, eps_low=args.eps_low,
                eps_high=args.eps_high, tis_cap=args.tis_cap, loss_agg=args.loss_agg,
                max_new=args.max_new_tokens, grad_clip=args.grad_clip,
                G=args.group_size if shared else 1, max_tokens=args.micro_tokens)


# ---- The loop ----------------------------------------------------------------------------------
def main(argv=None, loaded=None):
    args = get_args(argv)
    model, tok, bank, generator, train, opt, start, opt_steps = setup(args, loaded)
    total_steps = args.steps or args.epochs * (len(train) // args.batch_prompts)
    out, G = functools.partial(os.path.join, args.out), args.group_size
    update = functools.partial(policy_update, **update_flags(args, model))
    rank, world = dist.rank_world()
    generator.push(bank)  # v = 0, or the resumed v
    if args.eval_n and start == 0:
        checkpoint.append_jsonl(out("log.jsonl"), evaluation.heldout(generator, tok, args, 0))
    bar = tqdm(range(start, total_steps), "grpo", total_steps, initial=start, disable=rank > 0)
    for step in bar:
        t0 = time.time()
        # ---- data: the step's B prompts (this rank's share of each mini-batch), each G times
        full = task.batch_at(train, step, args.batch_prompts, args.seed)  # [(row, prompt ids)] × B
        mine = dist.shard(args.batch_prompts, rank, world, args.mini_batches)  # places in the batch
        batch = [full[i] for i in mine]
        prompts = [p for _, p in batch for _ in range(G)]  # (b·G) id lists
        problems = [row for row, _ in batch for _ in range(G)]  # (b·G) task rows

        # ---- rollout: G samples per prompt from the generator, which holds W0 + ΔW
        comps = generator.generate([p for _, p in batch], G, args.max_new_tokens, args.temperature,
                                   task.seed_for(args.seed, step + 1), index=mine)
        t_gen = time.time() - t0

        # ---- reward and advantages
        r = torch.tensor([task.reward(c["text"], p, c["finished"], args.reward)
                          for c, p in zip(comps, problems)])  # (b·G,)
        A = group_advantages(r, G)  # (b·G,)

        # ---- loss and step: PPO-clip through the unmerged adapter, TIS against the sampler
        t1 = time.time()
        seqs = [(p, c["ids"]) for p, c in zip(prompts, comps)]
        sampler_lp = padded_logprobs(comps)  # (b·G, C)
        lrs = [task.lr_at(opt_steps + m, total_steps * args.mini_batches, args.lr, args.warmup)
               for m in range(args.mini_batches)]
        old_lp, stats = update(model, bank, opt, seqs, A, sampler_lp, lrs)  # π_old (b·G, C)
        opt_steps, t_train = opt_steps + args.mini_batches, time.time() - t1

        # ---- sync: the generator gets W0 + ΔW for the next rollout
        t2 = time.time()
        kept = generator.push(bank)  # the share of ΔW it carries (a bf16 merge rounds some away)
        t_sync = time.time() - t2

        # ---- log (every rank's samples), then checkpoint; rank 0 writes
        r, comps, problems, old_lp = dist.gather_step(r, comps, problems, old_lp)
        row = dict(kind="train", step=step + 1, **metrics.step_metrics(
            r, G, comps, problems, old_lp, padded_logprobs(comps), stats, args.tis_cap),
            v_norm=bank.v.norm().item(), v_checksum=dist.same_on_all_ranks(bank.v), delta_kept=kept,
            lr=lrs[-1], t_gen=t_gen, t_train=t_train, t_sync=t_sync, t_step=time.time() - t0)
        checkpoint.append_jsonl(out("log.jsonl"), row)
        if rank == 0:
            checkpoint.save_run(args.out, bank, opt, step + 1, opt_steps, vars(args))
            bar.set_postfix(reward=f"{row['reward']:.2f}", gap=f"{row['logp_absgap']:.1e}",
                            v=f"{row['v_norm']:.3f}")
            if args.sample_every and (step + 1) % args.sample_every == 0:
                bar.write(metrics.sample_text(step + 1, r[0], problems[0], comps[0]))
    return finish(args, generator, tok, bank, total_steps)


def finish(args, generator, tok, bank, total_steps):
    """The held-out check, the adapter (also after resuming a finished run) and the reward plot."""
    log, adapter, plot = (os.path.join(args.out, f)
                          for f in ("log.jsonl", "adapter.safetensors", "reward.png"))
    if args.eval_n:
        checkpoint.append_jsonl(log, evaluation.heldout(generator, tok, args, total_steps))
    if dist.rank_world()[0] == 0:
        tinylora.save_adapter(bank, adapter, base_model=args.model)
        metrics.plot_rewards(log, plot)
        evals = [r for r in checkpoint.read_jsonl(log) if r["kind"] == "eval"]
        if len(evals) > 1:
            print(evaluation.before_after(evals[0], evals[-1]))
        print(f"done: adapter {adapter} ({bank.num_params()} parameters), log {log}, "
              f"reward plot {plot}")
    dist.barrier()
    return bank


if __name__ == "__main__":
    flags.run_cli(main)
