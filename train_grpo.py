"""
GRPO with TinyLoRA: train a few scalars with an exact-match reward, rollouts on the merged weights.

    python train_grpo.py --params 13                      # the paper's GSM8K recipe (GPU, Qwen2.5-7B-Instruct)
    python train_grpo.py --params 13 --preset cpu-demo    # ~4 min on a 2-core CPU: SmolLM2-135M, arithmetic
    python train_grpo.py --resume runs/cpu-demo            # continue a run exactly where it stopped
    torchrun --nproc-per-node 8 train_grpo.py --params 13  # data parallel: the same update, 8× the rollouts

One step: data -> rollout (vLLM or HF generate, on W0 + ΔW) -> reward -> group advantages -> PPO-clip loss
through the true unmerged adapter (only v has gradients) -> AdamW step(s) -> push W0 + ΔW to the
generator -> log + checkpoint. Defaults are the first author's verl GSM8K recipe (paper §5.1). Read this
file top to bottom: config, loss, loop; task.py holds the data and reward, engine.py the machinery.

Chosen where the paper is silent:
 1. π_old is the trainer's own forward before the first update of a rollout batch (with one mini-batch,
    the update pass itself); truncated importance sampling multiplies each token's loss by
    min(π_old/π_rollout, 2), π_rollout being the sampler's own log-probs.
 2. A = (r − mean_group)/(std_group + ε), std unbiased as in verl; a constant group gives A = 0.
 3. Data order: a permutation per epoch from (seed, epoch); each completion is sampled from (seed, step, its
    place in the batch). So a checkpoint needs only v, the Adam moments and the step: --resume is exact,
    on any number of ranks (torchrun: each rank takes whole groups of every mini-batch; v's gradient is summed).
 4. lr 2e-3: the author's code scales ΔW by lora_alpha/r = 16 and uses R/√u, so his swept 1e-5 … 2e-4
    are 1.6e-4 … 3.2e-3 here; 2e-3 is an informed guess, not re-swept on a GPU. The CPU demo's 1e-2 is
    the CPU sweep's choice on its validation split (of 1e-2, 3e-2, 1e-1; 1e-1 collapses).
 5. The loss pass runs each prompt once per group and its G completions on its KV cache: the same
    log-probs and gradient (tested) for a fraction of the token work (--no-shared-prompt to compare).
"""
import argparse
import functools
import json
import os
import sys
import time

import torch

import engine
import eval as evaluation
import task
import tinylora

# ---- Config: argparse grouped by concern; defaults = the paper's GSM8K recipe --------------------------
PRESETS = {  # cpu-demo = the CPU sweep's 13-parameter RL point (sweep.py --preset cpu-sweep; README)
    "cpu-demo": dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", data="arith", batch_prompts=4, group_size=8,
                     max_new_tokens=32, max_prompt=512, steps=12, lr=1e-2, mini_batches=1, warmup=0.0, val=100,
                     eval_n=200, dtype="float32", reward="strict", out="runs/cpu-demo"),
}
PRESETS["cpu-sweep"] = dict(PRESETS["cpu-demo"], out="runs/cpu-sweep")
SHARED_SMOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "models",
                           "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")


def parser():
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
    g.add_argument("--shots", type=int, default=None, help="solved train problems in the prompt (default: arith 2, else 0)")
    g.add_argument("--val", type=int, default=0, help="last N training problems held out as a validation split")
    g.add_argument("--reward", default="paper", choices=list(task.REWARDS),
                   help="paper: verl's GSM8K rule (the paper's); strict: stopped and numerically equal")
    g = ap.add_argument_group("rollout")
    g.add_argument("--backend", default="auto", choices=["auto", "vllm", "hf"])
    g.add_argument("--batch-prompts", type=int, default=64, help="prompts per rollout batch")
    g.add_argument("--group-size", type=int, default=4, help="samples per prompt (G)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=4096)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    g.add_argument("--sync", default="merged", choices=["merged", "lora"],
                   help="how vLLM gets ΔW: merged weights W0 + ΔW, or the exact rank-r LoRA (survives bf16)")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--steps", type=int, default=None, help="rollout steps (default: epochs over the data)")
    g.add_argument("--mini-batches", type=int, default=2, help="optimizer steps per rollout batch")
    g.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward (whole groups, at least one)")
    g.add_argument("--micro-tokens", type=int, default=0, help="also cap a micro-batch's padded tokens (0 = no cap)")
    g.add_argument("--no-shared-prompt", action="store_true", help="recompute each prompt for every sample (slower, same result)")
    g.add_argument("--grad-checkpointing", default="auto", choices=["auto", "on", "off"],
                   help="recompute each layer in backward (memory for time); auto: on with CUDA")
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
    g.add_argument("--seed", type=int, default=0, help="data order and sampling")
    g.add_argument("--proj-seed", type=int, default=0, help="the fixed random P and the SVD sketch")
    g.add_argument("--eval-n", type=int, default=0, help="held-out problems scored greedily before and after (0 = off)")
    g.add_argument("--sample-every", type=int, default=5, help="print a sample completion every k steps")
    g = ap.add_argument_group("scale-out (torchrun --nproc-per-node K train_grpo.py ...)")
    g.add_argument("--dist-timeout", type=float, default=1800, help="seconds a rank waits for the others before failing")
    g.add_argument("--tensor-parallel", type=int, default=1, help="GPUs per vLLM engine (vLLM's own tensor parallelism)")
    return ap


def get_args(argv=None):
    """Flags on top of the saved config (--resume) or a preset's values; then checked."""
    ap, argv = parser(), list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.resume:
        if not os.path.isfile(cfg_path := os.path.join(args.resume, "config.json")):
            raise ValueError(f"--resume {args.resume}: no config.json there")
        ap.set_defaults(**{k: v for k, v in json.load(open(cfg_path)).items() if k != "resolved"})  # re-resolved here
    elif args.preset:
        ap.set_defaults(**dict(PRESETS[args.preset], **(dict(model=SHARED_SMOL) if os.path.isfile(SHARED_SMOL) else {})))
    args = ap.parse_args(argv)  # explicit flags still win
    args.out = args.resume or args.out
    check_args(args)
    return args


def check_args(args):
    if args.u is None and args.n_tie is None and args.params <= 0:
        raise ValueError(f"--params must be positive, got {args.params}")
    if (args.u is None) != (args.n_tie is None):
        raise ValueError("--u and --n-tie go together")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; checked before anything starts
    if args.batch_prompts % (args.mini_batches * world):
        raise ValueError(f"--batch-prompts {args.batch_prompts} does not split into --mini-batches {args.mini_batches} "
                         f"× {world} ranks of whole groups")
    if args.tensor_parallel < 1 or world % args.tensor_parallel:
        raise ValueError(f"--tensor-parallel {args.tensor_parallel} must divide the {world} ranks")
    for k in ("batch_prompts", "group_size", "max_new_tokens", "micro_batch", "mini_batches", "epochs"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 for sampling, got {args.temperature}")
    engine.check_paths(args.model, args.data)
    if args.device == "auto" and args.model == parser().get_default("model") and not torch.cuda.is_available():
        raise ValueError("no GPU here: the paper's recipe would load Qwen2.5-7B in fp32 on the CPU; try --preset "
                         "cpu-demo, or pass --device cpu to insist")


# ---- Loss: pure functions on tensors ------------------------------------------------------------------
def group_advantages(r, G, eps=1e-6):
    """A = (r − mean_group)/(std_group + ε). r (B·G,) grouped consecutively -> (B·G,)."""
    g = r.view(-1, G)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1) if G > 1 else r * 0


def agg_weights(mask, mode, max_new, n_tokens=None, n_seqs=None):
    """Per-token weights whose sum with a per-token loss gives the aggregate. mask (B, T) float; n_tokens,
    n_seqs: the mini-batch's totals over all ranks (default: this mask's), so a rank's share sums to its part.

    token-mean: Σ/Σmask (verl, paper) · seq-mean-token-mean: mean over sequences of per-sequence means
    (original GRPO; length-biased) · seq-mean-token-sum-norm: Σ/(B·max_new) (Dr. GRPO)."""
    n_tokens = mask.sum().item() if n_tokens is None else n_tokens
    n_seqs = mask.shape[0] if n_seqs is None else n_seqs
    if mode == "token-mean":
        return mask / max(n_tokens, 1)
    if mode == "seq-mean-token-mean":
        return mask / mask.sum(1, keepdim=True).clamp_min(1) / n_seqs
    if mode == "seq-mean-token-sum-norm":
        return mask / (n_seqs * max_new)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def tis_weight(old_logp, rollout_logp, cap):
    """Truncated importance sampling: min(π_old/π_rollout, cap), per token, no gradient."""
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def ppo_clip_loss(logp, old_logp, A, eps_low, eps_high):
    """Per-token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), ρ = π/π_old. logp, old_logp (B, T); A (B,)."""
    rho = torch.exp(logp - old_logp)
    A = A[:, None]
    return -torch.minimum(rho * A, rho.clamp(1 - eps_low, 1 + eps_high) * A), rho


def grpo_loss(logp, old, roll, A, w, mask, eps_low, eps_high, tis_cap):
    """Σ w·TIS·PPO-clip over tokens, and how many tokens the clip cut off below and above.
    logp (b, c) with grad; old, roll (b, c) π_old and the sampler's log-probs; A (b,); w, mask (b, c)."""
    pg, rho = ppo_clip_loss(logp, old, A, eps_low, eps_high)
    loss = (pg * tis_weight(old, roll, tis_cap) * w).sum()
    clip_low = ((rho < 1 - eps_low) & (A[:, None] < 0) & mask.bool()).sum().item()
    clip_high = ((rho > 1 + eps_high) & (A[:, None] > 0) & mask.bool()).sum().item()
    return loss, clip_low, clip_high


def token_logprobs(model, seqs, temperature, G=1):
    """log π of every completion token through the adapter, with grad: (b, c) right-padded. seqs: (prompt ids,
    completion ids); G = 1: one pass over prompt + completion (prompts left-padded). G > 1: consecutive groups of
    G share a prompt, which runs once (with grad: v changes its keys and values too); its G completions run on its
    KV cache repeated G times (transformers' DynamicCache.batch_repeat_interleave): (Lp + G·C)/(G·(Lp + C)) of the work."""
    dev = next(model.parameters()).device
    Lp, C = max(len(p) for p, _ in seqs), max(len(c) for _, c in seqs)
    y = torch.tensor([c + [0] * (C - len(c)) for _, c in seqs], device=dev)  # (b, C) completion ids
    if G == 1:
        ids, mask = engine.left_pad([p + c + [0] * (C - len(c)) for p, c in seqs], Lp + C)
        mask[:, Lp:] = engine.completion_mask([len(c) for _, c in seqs], C).long()
        ids, mask = ids.to(dev), mask.to(dev)
        h = model.base_model(input_ids=ids, attention_mask=mask,
                             position_ids=(mask.cumsum(1) - 1).clamp_min(0)).last_hidden_state  # (b, Lp+C, H)
        return engine.head_logprobs(model, h[:, Lp - 1:Lp + C - 1], y, temperature)
    if model.training and model.is_gradient_checkpointing:
        raise ValueError("the shared-prompt pass needs the KV cache, which checkpointed layers drop: use G = 1")
    prompts = [seqs[i][0] for i in range(0, len(seqs), G)]
    if any(seqs[i][0] != prompts[i // G] for i in range(len(seqs))):
        raise ValueError(f"token_logprobs(G={G}): sequences must come in groups of {G} that share a prompt")
    ids, pmask = (t.to(dev) for t in engine.left_pad(prompts, Lp))  # (g, Lp)
    out = model.base_model(input_ids=ids, attention_mask=pmask, position_ids=(pmask.cumsum(1) - 1).clamp_min(0),
                           use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(G)  # (g·G, heads, Lp, d): the prompt's keys and values for each sample
    cmask = engine.completion_mask([len(c) for _, c in seqs], C).long().to(dev)  # (b, C)
    pos = pmask.sum(1).repeat_interleave(G)[:, None] + torch.arange(C, device=dev)  # (b, C)
    h = model.base_model(input_ids=y, attention_mask=torch.cat([pmask.repeat_interleave(G, 0), cmask], 1),
                         position_ids=pos, past_key_values=cache).last_hidden_state  # (b, C, H)
    h = torch.cat([out.last_hidden_state[:, -1:].repeat_interleave(G, 0), h[:, :C - 1]], 1)  # h predicts y
    return engine.head_logprobs(model, h, y, temperature)


@torch.no_grad()
def old_logprobs(model, seqs, C, temperature, micro_batch, G=1, max_tokens=0):
    """π_old (N, C): the current policy's log-probs, before any update of this rollout batch."""
    old = torch.zeros(len(seqs), C)
    for mb in engine.micro_batches([(len(p), len(c)) for p, c in seqs], micro_batch, G, max_tokens):
        lp = token_logprobs(model, [seqs[i] for i in mb], temperature, G)
        old[mb, :lp.shape[1]] = lp.cpu()
    return old


def accumulate_grad(model, seqs, rows, old, roll, A, W, mask, micro_batch, temperature, eps_low, eps_high,
                    tis_cap, fill_old=False, G=1, max_tokens=0):
    """Backward of the mini-batch loss Σ_rows W·ℓ, micro-batch by micro-batch (rows: indices into seqs, whole
    groups of G; W, mask (len(rows), C) aligned with rows). fill_old: this pass is π_old (one mini-batch), so
    old[rows] is set from it first. Returns the clip counts."""
    clip_low = clip_high = 0
    lengths = [(len(seqs[i][0]), len(seqs[i][1])) for i in rows]
    with engine.loss_mode(model):
        for mb in engine.micro_batches(lengths, micro_batch, G, max_tokens):
            ii = [rows[j] for j in mb]  # mb: positions in rows (and in W, mask); ii: indices into seqs
            lp = token_logprobs(model, [seqs[i] for i in ii], temperature, G)  # (b, c)
            c, dev = lp.shape[1], lp.device
            if fill_old:
                old[ii, :c] = lp.detach().cpu()
            loss, lo, hi = grpo_loss(lp, old[ii, :c].to(dev), roll[ii, :c].to(dev), A[ii].to(dev),
                                     W[mb, :c].to(dev), mask[mb, :c].to(dev), eps_low, eps_high, tis_cap)
            loss.backward()
            clip_low, clip_high = clip_low + lo, clip_high + hi
    return clip_low, clip_high


def policy_update(model, bank, opt, seqs, A, roll, lrs, micro_batch, temperature, eps_low, eps_high, tis_cap,
                  loss_agg, max_new, grad_clip, G=1, max_tokens=0):
    """One rollout batch -> len(lrs) AdamW steps on v, one per mini-batch of whole groups.
    seqs: (prompt ids, completion ids) per sample, G per group (G > 1: each prompt computed once per pass);
    A (N,); roll (N, C) the sampler's log-probs. Returns π_old (N, C) and the update's statistics.
    Under torchrun seqs are this rank's share of each mini-batch (engine.shard): the aggregation counts
    every rank's tokens and v's gradient is summed over ranks, so the step is the one-process step."""
    N, C, M = len(seqs), roll.shape[1], len(lrs)
    mask = engine.completion_mask([len(c) for _, c in seqs], C)  # (N, C)
    old = old_logprobs(model, seqs, C, temperature, micro_batch, G, max_tokens) if M > 1 else torch.zeros(N, C)
    stats = dict(clip_low=0, clip_high=0, grad_norm=0.0)
    for m, lr in enumerate(lrs):
        rows = list(range(m * N // M, (m + 1) * N // M))
        W = agg_weights(mask[rows], loss_agg, max_new, engine.all_sum(mask[rows].sum().item()),
                        engine.all_sum(len(rows)))  # (len(rows), C): the aggregation over the global mini-batch
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        lo, hi = accumulate_grad(model, seqs, rows, old, roll, A, W, mask[rows], micro_batch, temperature,
                                 eps_low, eps_high, tis_cap, fill_old=M == 1, G=G, max_tokens=max_tokens)
        engine.all_sum(bank.v.grad)
        stats["clip_low"], stats["clip_high"] = stats["clip_low"] + engine.all_sum(lo), stats["clip_high"] + engine.all_sum(hi)
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_([bank.v], grad_clip).item()
        opt.step()
    return old, stats


# ---- The loop ------------------------------------------------------------------------------------------
def main(argv=None, loaded=None):
    args = get_args(argv)
    model, tok, bank, gen, train, opt, start, opt_steps = engine.setup(args, loaded)
    total_steps = args.steps or args.epochs * (len(train) // args.batch_prompts)
    total_opt, log, out = total_steps * args.mini_batches, os.path.join(args.out, "log.jsonl"), functools.partial(os.path.join, args.out)
    update = functools.partial(policy_update, **update_flags(args, model))
    rank, world = engine.rank_world()
    gen.push(bank)  # v = 0, or the resumed v
    if args.eval_n and start == 0:
        engine.append_jsonl(log, evaluation.heldout(gen, tok, args, 0))
    from tqdm import tqdm
    for step in (bar := tqdm(range(start, total_steps), initial=start, total=total_steps, desc="grpo", disable=rank > 0)):
        t0 = time.time()
        # ---- data: the step's B prompts (this rank's share of each mini-batch), each repeated G times
        full = task.batch_at(train, step, args.batch_prompts, args.seed)  # [(row, prompt ids)] × B, every rank
        mine = engine.shard(args.batch_prompts, rank, world, args.mini_batches)  # positions in the global batch
        batch = [full[i] for i in mine]  # [(row, prompt ids)] × b
        prompts = [p for _, p in batch for _ in range(args.group_size)]  # (b·G) id lists
        problems = [row for row, _ in batch for _ in range(args.group_size)]  # (B·G) task rows

        # ---- rollout: G samples per prompt from the generator, which holds W0 + ΔW
        comps = gen.generate([p for _, p in batch], args.group_size, args.max_new_tokens, args.temperature,
                             task.mix(args.seed, step + 1), index=mine)
        t_gen = time.time() - t0

        # ---- reward and advantages
        r = torch.tensor([task.reward(c["text"], p, c["finished"], args.reward)
                          for c, p in zip(comps, problems)])  # (B·G,)
        A = group_advantages(r, args.group_size)  # (B·G,)

        # ---- loss and step: PPO-clip through the unmerged adapter, TIS against the sampler's log-probs
        t1 = time.time()
        seqs = [(p, c["ids"]) for p, c in zip(prompts, comps)]
        roll = engine.padded_logprobs(comps)  # (B·G, C) the sampler's log-probs
        lrs = [task.lr_at(opt_steps + m, total_opt, args.lr, args.warmup) for m in range(args.mini_batches)]
        old, stats = update(model, bank, opt, seqs, A, roll, lrs)  # π_old (B·G, C)
        opt_steps, t_train = opt_steps + args.mini_batches, time.time() - t1

        # ---- sync: the generator gets W0 + ΔW for the next rollout
        t2 = time.time()
        kept = gen.push(bank)  # the share of ΔW the generator's weights carry (bf16 merges round some away)
        t_sync = time.time() - t2

        # ---- log (every rank's samples, gathered), then checkpoint; rank 0 writes, on resume rows past the checkpoint go
        r, comps, problems, old = engine.gather_step(r, comps, problems, old)
        row = dict(kind="train", step=step + 1, **engine.step_metrics(r, args.group_size, comps, problems, old,
                                                                      engine.padded_logprobs(comps), stats, args.tis_cap),
                   v_norm=bank.v.norm().item(), v_checksum=engine.same_on_all_ranks(bank.v), delta_kept=kept, lr=lrs[-1], t_gen=t_gen,
                   t_train=t_train, t_sync=t_sync, t_step=time.time() - t0)
        engine.append_jsonl(log, row)
        if rank > 0:
            continue
        engine.save_checkpoint(out("checkpoint.safetensors"), bank, opt, step + 1, opt_steps, vars(args))
        tinylora.save_adapter(bank, out("adapter.safetensors"), base_model=args.model)
        bar.set_postfix(reward=f"{row['reward']:.2f}", gap=f"{row['logp_absgap']:.1e}", v=f"{row['v_norm']:.3f}")
        if args.sample_every and (step + 1) % args.sample_every == 0:
            tqdm.write(f"--- step {step + 1} sample (reward {r[0]:.0f}, gold {problems[0]['gold']:g}):\n"
                       f"{comps[0]['text']}\n---")

    return finish(args, gen, tok, bank, total_steps)


def update_flags(args, model):
    return dict(micro_batch=args.micro_batch, temperature=args.temperature, eps_low=args.eps_low, eps_high=args.eps_high,
                tis_cap=args.tis_cap, loss_agg=args.loss_agg, max_new=args.max_new_tokens, grad_clip=args.grad_clip,
                G=1 if args.no_shared_prompt or model.is_gradient_checkpointing else args.group_size,
                max_tokens=args.micro_tokens)


def finish(args, gen, tok, bank, total_steps):
    """The held-out check, the adapter (also after resuming a finished run) and the reward plot."""
    log, adapter = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "adapter.safetensors")
    if args.eval_n:
        engine.append_jsonl(log, evaluation.heldout(gen, tok, args, total_steps))
    if engine.rank_world()[0] == 0:
        tinylora.save_adapter(bank, adapter, base_model=args.model)
        engine.plot_rewards(log, os.path.join(args.out, "reward.png"))
        print(f"done: adapter {adapter} ({bank.num_params()} parameters)")
    engine.barrier()
    return bank


if __name__ == "__main__":
    engine.run_cli(main)
