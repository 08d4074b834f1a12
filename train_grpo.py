"""
GRPO with TinyLoRA: train a few scalars with an exact-match reward, rollouts on the merged weights.

    python train_grpo.py --params 13                      # the paper's recipe (GPU, Qwen2.5-7B)
    python train_grpo.py --recipe math --params 13        # its MATH recipe (Table 2): SimpleRL's
    python train_grpo.py --params 13 --preset cpu-demo    # a 2-core CPU: SmolLM2-135M, arithmetic
    python train_grpo.py --resume runs/cpu-demo            # continue exactly where it stopped
    torchrun --nproc-per-node 8 train_grpo.py --params 13  # data parallel, the same update

One step: data -> rollout (on W0 + ΔW) -> reward -> group advantages -> PPO-clip loss through the
unmerged adapter (only v has gradients) -> AdamW step(s) -> push W0 + ΔW to the generator -> log.
Top to bottom: the loss, log-probs, the update, then the build and the loop. Every default (the
paper's recipe): harness/config.py; the data and reward: task.py; the generator: rollout.py.

Where the paper is silent, the first author's verl GSM8K recipe (docs/reproduction.md), in this
parameterisation's units: the fork scales ΔW by lora_alpha/r = 16, so its lr is × 16 here, its
gradient clip and weight decay ÷ 16 (lr 2e-3: his 1.25e-4; no fork script gives a 13-parameter
rate, and it was not swept on a GPU). And:
 1. π_old is the trainer's own forward before the first update of a rollout batch; truncated
    importance sampling weighs each token's loss by min(π_old/π_sampler, 2) (the sampler's π).
 2. A = (r − mean_group)/(std_group + ε), std unbiased as in verl; a constant group gives A = 0.
 3. Each completion is sampled from (seed, step, its place in the batch), and the data order is
    the file's (or a permutation per epoch): a checkpoint needs only v, the Adam moments, the step.
"""
import time
from collections import namedtuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import eval as evaluation
import rollout
import task
import tinylora
from harness import config, models, run, scale

# ---- Loss: pure functions on tensors -----------------------------------------------------------
def group_advantages(rewards, G, eps=1e-6):
    """A = (r − mean_group)/(std_group + ε). rewards r (B·G,), grouped consecutively -> (B·G,)."""
    if G == 1:
        return rewards * 0
    g = rewards.view(-1, G)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1)

def agg_weights(mask, mode, max_new, n_tokens=None, n_seqs=None):
    """Per-token weights whose sum with a per-token loss gives the aggregate; n_tokens, n_seqs: the
    totals over all ranks (default: this mask's (B, T)). token-mean: Σ/Σmask (verl, the paper);
    seq-mean-token-mean: a mean of sequence means (GRPO); seq-mean-token-sum-norm: Σ/(B·max_new)."""
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

def low_var_kl(logp, ref_lp):
    """verl's k3 estimate of KL(π ‖ π_ref) per token, exp(δ) − δ − 1 with δ = log π_ref − log π,
    clamped as verl (core_algos.kl_penalty 'low_var_kl'): δ to ±20, the result to ±10."""
    delta = (ref_lp - logp).clamp(-20, 20)
    return (delta.exp() - delta - 1).clamp(-10, 10)

def ppo_clip_loss(logp, old_lp, A, eps_low, eps_high, dual_clip=0.0):
    """Per-token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), ρ = π/π_old; dual_clip c > 0: verl's dual
    clip caps the loss of a negative advantage at −cA. logp, old_lp (B, T); A (B,)."""
    rho, A = torch.exp(logp - old_lp), A[:, None]
    loss = -torch.minimum(rho * A, rho.clamp(1 - eps_low, 1 + eps_high) * A)
    if dual_clip:
        loss = torch.where(A < 0, torch.minimum(loss, -dual_clip * A), loss)
    return loss, rho

# The loss's constants, the flags of the same names (harness/config.py)
Hyper = namedtuple("Hyper", "eps_low eps_high dual_clip tis_cap loss_agg max_new_tokens kl_coef "
                   "entropy_coef")
# How the loss pass runs, the same numbers in less memory or time: log π after the temperature,
# micro-batches of whole groups (micro_batch sequences, about micro_tokens tokens), each group's
# prompt run once when G > 1 (harness/scale.py; G = 1 under checkpointing), or plain:
# token_logprobs below; entropy: each token's H(π) too
Pass = namedtuple("Pass", "temperature micro_batch micro_tokens G plain entropy")

def grpo_loss(logp, old_lp, sampler_lp, A, w, hyper, ref_lp=None, entropy=None):
    """Σ w·(TIS·PPO-clip + kl_coef·k3(π, π_ref) − entropy_coef·H(π)) over tokens (verl's), and the
    sums over real tokens of the clip's cuts below and above, k3 and H. logp (b, T) with grad;
    old_lp, sampler_lp, ref_lp, entropy (b, T); A (b,); w (b, T), > 0 on completion tokens."""
    pg, rho = ppo_clip_loss(logp, old_lp, A, hyper.eps_low, hyper.eps_high, hyper.dual_clip)
    loss = (pg * tis_weight(old_lp, sampler_lp, hyper.tis_cap) * w).sum()
    real, A = w > 0, A[:, None]
    sums = dict(clip_low=((rho < 1 - hyper.eps_low) & (A < 0) & real).sum().item(),
                clip_high=((rho > 1 + hyper.eps_high) & (A > 0) & real).sum().item())
    if hyper.kl_coef:
        kl = low_var_kl(logp, ref_lp)
        loss, sums["kl"] = loss + hyper.kl_coef * (kl * w).sum(), kl[real].sum().item()
    if hyper.entropy_coef:
        loss = loss - hyper.entropy_coef * (entropy * w).sum()
        sums["entropy"] = entropy[real].sum().item()
    return loss, sums

# ---- Log-probs through the adapter ---------------------------------------------------------------
def token_logprobs(model, seqs, temperature, entropy=False):
    """log π of every completion token through the adapter, with grad: (b, C), right-padded (with
    entropy: and each position's H(π), a pair). seqs: (prompt ids, completion ids) per sample; one
    forward over each prompt + completion."""
    dev, L = next(model.parameters()).device, max(len(p) + len(c) for p, c in seqs)
    ids = torch.tensor([p + c + [0] * (L - len(p) - len(c)) for p, c in seqs], device=dev)  # (b, L)
    # right padding: the real tokens keep their positions 0, 1, ...
    mask = scale.length_mask([len(p) + len(c) for p, c in seqs], L).long().to(dev)  # (b, L)
    logits = model(input_ids=ids, attention_mask=mask).logits.float() / temperature  # (b, L, V)
    logp = logits[:, :-1].log_softmax(-1)  # (b, L-1, V): token t+1
    lp = logp.gather(-1, ids[:, 1:, None])[..., 0]  # (b, L-1)
    C = max(len(c) for _, c in seqs)

    def completions(x):  # (b, L-1) -> (b, C)
        return torch.stack([F.pad(x[i, len(p) - 1:len(p) - 1 + len(c)], (0, C - len(c)))
                            for i, (p, c) in enumerate(seqs)])
    if not entropy:
        return completions(lp)
    return completions(lp), completions(-(logp.exp() * logp).sum(-1))

def logprobs(model, seqs, how):
    """(log π (b, C), H(π) (b, C) or None): token_logprobs, or by default the same numbers faster
    (harness/scale.token_logprobs)."""
    if how.plain:
        out = token_logprobs(model, seqs, how.temperature, how.entropy)
    else:
        out = scale.token_logprobs(model, seqs, how.temperature, how.G, how.entropy)
    return out if how.entropy else (out, None)

# ---- The update: π_old, then one AdamW step per mini-batch of whole groups ----------------------
# A rollout batch: (prompt ids, completion ids) per sample, G per prompt; A (N,); the sampler's
# and (with a KL term) the base model's log-probs (N, C), right-padded.
Rollouts = namedtuple("Rollouts", "seqs A sampler_lp ref_lp")

@torch.no_grad()
def old_logprobs(model, seqs, C, how):
    """π_old (N, C): the current policy's log-probs, before any update of this rollout batch."""
    old_lp = torch.zeros(len(seqs), C)
    lengths = [(len(p), len(c)) for p, c in seqs]
    for micro in scale.micro_batches(lengths, how.micro_batch, how.G, how.micro_tokens):
        lp, _ = logprobs(model, [seqs[i] for i in micro], how._replace(entropy=False))
        old_lp[micro, :lp.shape[1]] = lp.cpu()
    return old_lp

@torch.no_grad()
def ref_logprobs(model, bank, seqs, C, how):
    """π_ref (N, C), the base model's log-probs: with TinyLoRA the base is this model at v = 0, so
    no second model; one no-grad pass with v zeroed (the same fast pass as π_old's), then v back."""
    v = bank.v.detach().clone()
    bank.v.zero_()
    try:
        return old_logprobs(model, seqs, C, how)
    finally:
        bank.v.copy_(v)

def minibatch_backward(model, rollouts, idx, old_lp, w, hyper, how):
    """Backward of one mini-batch's loss Σ w·ℓ over the samples idx (whole groups), micro-batch by
    micro-batch; w (len(idx), C). old_lp None: this pass is π_old (one mini-batch per batch).
    Returns its log-probs (len(idx), C), detached, and the tokens clipped below and above."""
    lengths = [(len(rollouts.seqs[i][0]), len(rollouts.seqs[i][1])) for i in idx]
    lp_out, sums = torch.zeros(w.shape), {}
    with scale.loss_mode(model):  # train() only when the layers are checkpointed
        for micro in scale.micro_batches(lengths, how.micro_batch, how.G, how.micro_tokens):
            picked = [idx[j] for j in micro]  # their places in rollouts
            lp, entropy = logprobs(model, [rollouts.seqs[i] for i in picked], how)  # with grad
            T, dev = lp.shape[1], lp.device  # lp (b, T)
            old = lp.detach() if old_lp is None else old_lp[picked, :T].to(dev)
            ref = None if rollouts.ref_lp is None else rollouts.ref_lp[picked, :T].to(dev)
            loss, micro_sums = grpo_loss(lp, old, rollouts.sampler_lp[picked, :T].to(dev),
                                         rollouts.A[picked].to(dev), w[micro, :T].to(dev), hyper,
                                         ref_lp=ref, entropy=entropy)
            loss.backward()
            lp_out[micro, :T] = lp.detach().cpu()
            sums = {k: sums.get(k, 0) + x for k, x in micro_sums.items()}
    return lp_out, sums

def step_v(opt, lr, grad_clip):
    """One AdamW step at `lr` on v (the optimizer's tensor), its gradient summed and clipped."""
    (v,) = opt.param_groups[0]["params"]
    opt.param_groups[0]["lr"] = lr
    scale.all_sum(v.grad)
    norm = torch.nn.utils.clip_grad_norm_([v], grad_clip).item()
    opt.step()
    return norm

def policy_update(model, opt, rollouts, lrs, hyper, how, grad_clip):
    """One rollout batch -> len(lrs) AdamW steps on v; π_old (N, C) and the update's statistics.
    (Under torchrun, rollouts is this rank's share; the weights count every rank's tokens.)"""
    N, C, M = len(rollouts.seqs), rollouts.sampler_lp.shape[1], len(lrs)
    mask = scale.length_mask([len(c) for _, c in rollouts.seqs], C)  # (N, C): completion tokens
    old_lp = old_logprobs(model, rollouts.seqs, C, how) if M > 1 else None
    stats = {}  # over every token of the batch (every rank's): sums, then the last gradient norm
    for m, lr in enumerate(lrs):
        idx = list(range(m * N // M, (m + 1) * N // M))  # the mini-batch, whole groups
        n_tokens, n_seqs = scale.all_sum(mask[idx].sum().item()), scale.all_sum(len(idx))
        w = agg_weights(mask[idx], hyper.loss_agg, hyper.max_new_tokens, n_tokens, n_seqs)
        opt.zero_grad(set_to_none=True)
        lp, sums = minibatch_backward(model, rollouts, idx, old_lp, w, hyper, how)
        stats = {k: stats.get(k, 0) + scale.all_sum(x) for k, x in sums.items()}
        stats["grad_norm"] = step_v(opt, lr, grad_clip)
    return (lp if old_lp is None else old_lp), stats

# ---- main: the build, then the loop -------------------------------------------------------------
def make_generator(args, runtime, model, tok, bank):
    """The rollout engine the flags ask for: vLLM in-process on W0 + ΔW, or HF generate."""
    return rollout.make_generator(
        runtime.backend, model, tok, bank, args.model, args.out,
        args.max_prompt + args.max_new_tokens, args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization, sync=args.sync,
        tensor_parallel=args.tensor_parallel)

def build(args, shared=None):
    """Both trainers' build: the runtime, the data, the model with TinyLoRA (v = 0: the base), the
    optimizer on v, the generator, the resumed state. shared: (model, tok, generator) built once
    for many runs (harness/sweep.py)."""
    runtime = models.runtime(args.device, args.dtype, args.backend, args.dist_timeout,
                        args.grad_checkpointing, args.batch_invariant)
    config.print_config(args, runtime)  # every resolved value, on the console and in config.json
    problems, shots = task.load_task(args.data, "train", args.shots, args.val)
    model, tok = (shared[:2] if shared
                  else models.load_model(args.model, runtime.dtype, runtime.device))
    bank = tinylora.apply_tinylora(model, **config.adapter_kwargs(args))  # v = 0: the base
    scale.prepare_memory(model, args, runtime, plan=not shared)  # checkpointing; CUDA's memory plan
    train = task.prompt_ids(tok, problems, shots, args.max_prompt, args.prompt)  # [(problem, ids)]
    run.start(args, runtime, bank, problems, train)  # the plan, the data, config.json
    opt = torch.optim.AdamW([bank.v], lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay)
    generator = shared[2] if shared else make_generator(args, runtime, model, tok, bank)
    return runtime, model, tok, bank, train, opt, generator, run.resume(args, bank, opt)

def main(argv=None, shared=None):
    """Train (shared: see build)."""
    args = config.trainer_args(argv)  # the flags over a preset or the resumed run's config.json
    runtime, model, tok, bank, train, opt, generator, (start, opt_steps) = build(args, shared)
    total_steps = args.steps or args.epochs * (len(train) // args.batch_prompts)
    G, one_prompt_pass = args.group_size, not (args.no_shared_prompt or
                                               model.is_gradient_checkpointing)
    hyper = Hyper(**{k: vars(args)[k] for k in Hyper._fields})
    how = Pass(temperature=args.temperature, micro_batch=args.micro_batch,
               micro_tokens=args.micro_tokens, G=G if one_prompt_pass else 1,
               plain=args.plain_logprobs, entropy=args.entropy_coef > 0)
    generator.push(bank)  # v = 0, or the resumed v
    if args.eval_n and start == 0:
        run.log(args, evaluation.heldout(generator, tok, args, 0))
    bar = tqdm(range(start, total_steps), "grpo", total_steps, initial=start,
               disable=runtime.rank > 0)
    for step in bar:
        t0 = time.time()
        # ---- data: the step's B prompts (this rank's share of each mini-batch), each G times
        full = task.batch_at(train, step, args.batch_prompts, args.seed, args.shuffle)  # × B
        positions = scale.shard(args.batch_prompts, runtime.rank, runtime.world, args.mini_batches)
        batch = [full[i] for i in positions]
        prompts = [p for _, p in batch for _ in range(G)]  # (b·G) id lists
        problems = [problem for problem, _ in batch for _ in range(G)]  # (b·G)

        # ---- rollout: G samples per prompt from the generator, which holds W0 + ΔW
        completions = generator.generate([p for _, p in batch], G, args.max_new_tokens,
                                         args.temperature, task.seed_for(args.seed, step + 1),
                                         index=positions)
        t_gen = time.time() - t0

        # ---- reward and advantages
        rewards = torch.tensor([task.reward(c["text"], p, c["finished"], args.reward)
                                for c, p in zip(completions, problems)])  # (b·G,)
        A = group_advantages(rewards, G)  # (b·G,)

        # ---- loss and step: PPO-clip through the unmerged adapter, TIS against the sampler
        t1 = time.time()
        seqs = [(p, c["ids"]) for p, c in zip(prompts, completions)]
        lrs = [task.lr_at(step, total_steps, args.lr, args.warmup)] * args.mini_batches
        sampler_lp = run.sampler_logprobs(completions)  # (b·G, C)
        ref_lp = ref_logprobs(model, bank, seqs, sampler_lp.shape[1], how) if args.kl_coef else None
        rollouts = Rollouts(seqs, A, sampler_lp, ref_lp)
        old_lp, stats = policy_update(model, opt, rollouts, lrs, hyper, how, args.grad_clip)
        opt_steps, t_train = opt_steps + args.mini_batches, time.time() - t1

        # ---- sync: the generator gets W0 + ΔW for the next rollout
        t2 = time.time()
        delta_kept = generator.push(bank)  # the share of ΔW it carries (a bf16 merge rounds)
        t_sync = time.time() - t2

        # ---- log (every rank's samples), then checkpoint; rank 0 writes
        rewards, completions, problems, old_lp = scale.gather_step(rewards, completions, problems,
                                                                   old_lp)
        record = dict(kind="train", step=step + 1, **run.step_metrics(
            rewards, G, completions, problems, old_lp, stats, args.tis_cap),
            v_norm=bank.v.norm().item(), v_checksum=scale.same_on_all_ranks(bank.v),
            delta_kept=delta_kept, lr=lrs[-1], t_gen=t_gen, t_train=t_train, t_sync=t_sync,
            t_step=time.time() - t0)
        run.save_step(args, record, bank, opt, opt_steps)
        if runtime.rank == 0:
            run.time_left(args.out, step + 1, start, total_steps, len(train) // args.batch_prompts)
            bar.set_postfix(reward=f"{record['reward']:.2f}", gap=f"{record['logp_absgap']:.1e}",
                            v=f"{record['v_norm']:.3f}")
            if args.sample_every and (step + 1) % args.sample_every == 0:
                bar.write(run.sample_text(step + 1, rewards[0], problems[0], completions[0]))
    if args.eval_n:  # the held-out check after training (its account: run.finish)
        generator.push(bank)
        run.log(args, evaluation.heldout(generator, tok, args, total_steps))
    return run.finish(args, bank)

if __name__ == "__main__":
    config.run_cli(main)
