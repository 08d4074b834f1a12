"""
GRPO with TinyLoRA: train a few scalars with an exact-match reward, rollouts on the merged weights.

    python train_grpo.py --params 13                      # the paper's recipe (GPU, Qwen2.5-7B)
    python train_grpo.py --params 13 --preset cpu-demo    # a 2-core CPU: SmolLM2-135M, arithmetic
    python train_grpo.py --resume runs/cpu-demo            # continue exactly where it stopped
    torchrun --nproc-per-node 8 train_grpo.py --params 13  # data parallel, the same update

One step: data -> rollout (on W0 + ΔW) -> reward -> group advantages -> PPO-clip loss through the
unmerged adapter (only v has gradients) -> AdamW step(s) -> push W0 + ΔW to the generator -> log.
Top to bottom: config, loss, log-probs, update, main (the build, the loop); task.py: the data and
reward; rollout.py: the generator; harness/: the machinery.

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

import rollout
import task
import tinylora
from harness import models, run, scale

# ---- Config: the flags, grouped by concern; every default is the paper's GSM8K recipe ---------
def model_flags(ap, runtime=True):
    g = ap.add_argument_group("model")
    g.add_argument("--model", default=run.PAPER_MODEL, help="hub id, local folder or .gguf file")
    if runtime:  # auto: CUDA and bf16 weights with a GPU, else the CPU and fp32 (v is always fp32)
        g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
        g.add_argument("--device", default="auto")

def adapter_flags(ap, factors=True):
    g = ap.add_argument_group("adapter")
    g.add_argument("--params", type=int, default=13, help="exact number of trainable scalars")
    g.add_argument("--u", type=int, default=None, help="scalars per group (with --n-tie)")
    g.add_argument("--n-tie", type=int, default=None, help="modules per tile (the paper's n_tie)")
    g.add_argument("--r", type=int, default=2, help="frozen SVD rank")
    g.add_argument("--tie", default="tiled", choices=["tiled", "structured"])
    g.add_argument("--targets", default=",".join(tinylora.DEFAULT_TARGETS))
    g.add_argument("--lora-xs", action="store_true", help="u = r², P = standard basis")
    g.add_argument("--projections", default="fork", choices=["fork", "independent"],
                   help="P as the author's fork draws it (one per input width), or one per module")
    g.add_argument("--v-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    if factors:
        g.add_argument("--svd", default="randomized", choices=["randomized", "exact"])
        g.add_argument("--proj-seed", type=int, default=0, help="the SVD sketch, independent P")

def data_flags(ap):
    g = ap.add_argument_group("data")
    g.add_argument("--data", default="openai/gsm8k", help="hub id, .jsonl, folder, arith")
    g.add_argument("--max-prompt", type=int, default=512)
    g.add_argument("--shots", type=int, default=None, help="solved problems in a prompt")
    g.add_argument("--val", type=int, default=0, help="last N train problems: validation")

def generator_flags(ap):
    g = ap.add_argument_group("generator")
    g.add_argument("--backend", default="auto", choices=["auto", "vllm", "hf"])
    g.add_argument("--max-new-tokens", type=int, default=4096)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                   help="vLLM's share of the card (the rest: the trainer and its activations)")
    g.add_argument("--seed", type=int, default=0, help="data order and sampling")

def get_args(argv=None):
    ap = run.new_parser(__doc__.split("\n")[1])
    # then the loss pass and torchrun (the same numbers in less memory or time), and this run
    for add in (model_flags, adapter_flags, data_flags, generator_flags, scale.add_flags,
                run.add_flags):
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
    g.add_argument("--lr", type=float, default=2e-3, help="the fork's 1.25e-4, × 16")
    g.add_argument("--warmup", type=float, default=0.05, help="of the steps, from lr 0 (verl)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--weight-decay", type=float, default=0.01 / 16, help="the fork's 0.01, / 16")
    g.add_argument("--grad-clip", type=float, default=1 / 16, help="the fork's 1.0, / 16")
    g.add_argument("--shuffle", action="store_true", help="a permutation per epoch (fork: none)")
    g.add_argument("--eps-low", type=float, default=0.2)
    g.add_argument("--eps-high", type=float, default=0.4)
    g.add_argument("--dual-clip", type=float, default=3.0, help="verl's c (0: off)")
    g.add_argument("--tis-cap", type=float, default=2.0)
    g.add_argument("--loss-agg", default="token-mean",
                   choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    return run.parse(ap, argv)

# ---- Loss: pure functions on tensors -----------------------------------------------------------
def group_advantages(r, G, eps=1e-6):
    """A = (r − mean_group)/(std_group + ε). r (B·G,) grouped consecutively -> (B·G,)."""
    if G == 1:
        return r * 0
    g = r.view(-1, G)
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

def ppo_clip_loss(logp, old_lp, A, eps_low, eps_high, c=0.0):
    """Per-token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), ρ = π/π_old; c > 0: verl's dual clip caps
    the loss of a negative advantage at −cA. logp, old_lp (B, T); A (B,)."""
    rho, A = torch.exp(logp - old_lp), A[:, None]
    loss = -torch.minimum(rho * A, rho.clamp(1 - eps_low, 1 + eps_high) * A)
    return (torch.where(A < 0, torch.minimum(loss, -c * A), loss) if c else loss), rho

# The update's constants, the flags of the same names. G > 1: each group's prompt runs once in the
# loss pass (harness/scale.py; 1 under checkpointing); plain: token_logprobs below; dual_clip: c.
Hyper = namedtuple("Hyper", "eps_low eps_high tis_cap loss_agg max_new_tokens temperature "
                   "grad_clip micro_batch micro_tokens G plain dual_clip",
                   defaults=(0, 1, False, 0.0))

def grpo_loss(logp, old_lp, sampler_lp, A, w, hp):
    """Σ w·TIS·PPO-clip over tokens, and how many tokens the clip cut off below and above.
    logp (b, c) with grad; old_lp, sampler_lp (b, c); A (b,); w (b, c), > 0 on completion tokens."""
    pg, rho = ppo_clip_loss(logp, old_lp, A, hp.eps_low, hp.eps_high, hp.dual_clip)
    loss = (pg * tis_weight(old_lp, sampler_lp, hp.tis_cap) * w).sum()
    real, A = w > 0, A[:, None]
    clip_low = ((rho < 1 - hp.eps_low) & (A < 0) & real).sum().item()
    clip_high = ((rho > 1 + hp.eps_high) & (A > 0) & real).sum().item()
    return loss, clip_low, clip_high

# ---- Log-probs through the adapter ---------------------------------------------------------------
def token_logprobs(model, seqs, temperature):
    """log π of every completion token through the adapter, with grad: (b, C), right-padded. seqs:
    (prompt ids, completion ids) per sample; one forward over each prompt + completion."""
    dev, L = next(model.parameters()).device, max(len(p) + len(c) for p, c in seqs)
    ids = torch.tensor([p + c + [0] * (L - len(p) - len(c)) for p, c in seqs], device=dev)  # (b, L)
    # right padding: the real tokens keep their positions 0, 1, ...
    mask = scale.completion_mask([len(p) + len(c) for p, c in seqs], L).long().to(dev)  # (b, L)
    logits = model(input_ids=ids, attention_mask=mask).logits.float() / temperature  # (b, L, V)
    lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (b, L-1): token t+1
    C = max(len(c) for _, c in seqs)
    return torch.stack([F.pad(lp[i, len(p) - 1:len(p) - 1 + len(c)], (0, C - len(c)))
                        for i, (p, c) in enumerate(seqs)])

def logprobs(model, seqs, hp):
    """token_logprobs, or by default the same numbers faster: harness/scale.token_logprobs."""
    if hp.plain:
        return token_logprobs(model, seqs, hp.temperature)
    return scale.token_logprobs(model, seqs, hp.temperature, hp.G)

# ---- The update: π_old, then one AdamW step per mini-batch of whole groups ----------------------
# A rollout batch: (prompt ids, completion ids) per sample, G per prompt; A (N,); the sampler's
# log-probs (N, C), right-padded.
Rollouts = namedtuple("Rollouts", "seqs A sampler_lp")

@torch.no_grad()
def old_logprobs(model, seqs, C, hp):
    """π_old (N, C): the current policy's log-probs, before any update of this rollout batch."""
    old_lp = torch.zeros(len(seqs), C)
    lengths = [(len(p), len(c)) for p, c in seqs]
    for mb in scale.micro_batches(lengths, hp.micro_batch, hp.G, hp.micro_tokens):
        lp = logprobs(model, [seqs[i] for i in mb], hp)
        old_lp[mb, :lp.shape[1]] = lp.cpu()
    return old_lp

def minibatch_backward(model, ro, idx, old_lp, w, hp):
    """Backward of one mini-batch's loss Σ w·ℓ over the samples idx (whole groups), micro-batch by
    micro-batch; w (len(idx), C). old_lp None: this pass is π_old (one mini-batch per batch).
    Returns its log-probs (len(idx), C), detached, and the tokens clipped below and above."""
    lengths = [(len(ro.seqs[i][0]), len(ro.seqs[i][1])) for i in idx]
    lp_out, clip_low, clip_high = torch.zeros(w.shape), 0, 0
    with scale.loss_mode(model):  # train() only when the layers are checkpointed
        for mb in scale.micro_batches(lengths, hp.micro_batch, hp.G, hp.micro_tokens):
            rows = [idx[j] for j in mb]  # indices into ro
            lp = logprobs(model, [ro.seqs[i] for i in rows], hp)  # (b, c) with grad
            c, dev = lp.shape[1], lp.device
            old = lp.detach() if old_lp is None else old_lp[rows, :c].to(dev)
            loss, lo, hi = grpo_loss(lp, old, ro.sampler_lp[rows, :c].to(dev), ro.A[rows].to(dev),
                                     w[mb, :c].to(dev), hp)
            loss.backward()
            lp_out[mb, :c] = lp.detach().cpu()
            clip_low, clip_high = clip_low + lo, clip_high + hi
    return lp_out, clip_low, clip_high

def step_v(opt, lr, grad_clip):
    """One AdamW step at `lr` on v (the optimizer's tensor), its gradient summed and clipped."""
    (v,) = opt.param_groups[0]["params"]
    opt.param_groups[0]["lr"] = lr
    scale.all_sum(v.grad)
    norm = torch.nn.utils.clip_grad_norm_([v], grad_clip).item()
    opt.step()
    return norm

def policy_update(model, opt, ro, lrs, hp):
    """One rollout batch -> len(lrs) AdamW steps on v; π_old (N, C) and the update's statistics.
    (Under torchrun, ro is this rank's share; the weights count every rank's tokens.)"""
    N, C, M = len(ro.seqs), ro.sampler_lp.shape[1], len(lrs)
    mask = scale.completion_mask([len(c) for _, c in ro.seqs], C)  # (N, C)
    old_lp = old_logprobs(model, ro.seqs, C, hp) if M > 1 else None
    stats = dict(clip_low=0, clip_high=0, grad_norm=0.0)
    for m, lr in enumerate(lrs):
        idx = list(range(m * N // M, (m + 1) * N // M))  # the mini-batch, whole groups
        n_tokens, n_seqs = scale.all_sum(mask[idx].sum().item()), scale.all_sum(len(idx))
        w = agg_weights(mask[idx], hp.loss_agg, hp.max_new_tokens, n_tokens, n_seqs)  # (n, C)
        opt.zero_grad(set_to_none=True)
        lp, lo, hi = minibatch_backward(model, ro, idx, old_lp, w, hp)
        stats["clip_low"] += scale.all_sum(lo)
        stats["clip_high"] += scale.all_sum(hi)
        stats["grad_norm"] = step_v(opt, lr, hp.grad_clip)
    return (lp if old_lp is None else old_lp), stats

# ---- main: the build, then the loop -------------------------------------------------------------
def make_generator(args, rt, model, tok, bank):
    """The rollout engine the flags ask for: vLLM in-process on W0 + ΔW, or HF generate."""
    return rollout.make_generator(
        rt.backend, model, tok, bank, args.model, args.out, args.max_prompt + args.max_new_tokens,
        args.seed, gpu_memory_utilization=args.gpu_memory_utilization, sync=args.sync,
        tensor_parallel=args.tensor_parallel, batch_invariant=args.batch_invariant)

def main(argv=None, loaded=None):
    """Train. loaded: (model, tok, generator) built once for many runs (harness/sweep.py)."""
    args = get_args(argv)  # the flags over a preset or the resumed run's config.json
    rt = models.runtime(args.device, args.dtype, args.backend, args.dist_timeout,
                        args.grad_checkpointing, args.batch_invariant)
    run.print_config(args, rt)  # every resolved value, on the console (and in config.json)
    rows, shots = task.load_task(args.data, "train", args.shots, args.val)
    model, tok = loaded[:2] if loaded else models.load_model(args.model, rt.dtype, rt.device)
    bank = tinylora.apply_tinylora(model, **run.adapter_kwargs(args))  # v = 0: the base model
    scale.fit(model, args, rt, plan=not loaded)  # checkpointing; on CUDA the memory plan
    train = task.prompt_ids(tok, rows, shots, args.max_prompt)  # [(row, prompt ids)]
    run.start(args, rt, bank, rows, train)  # the plan, the data, config.json
    opt = torch.optim.AdamW([bank.v], lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay)
    generator = loaded[2] if loaded else make_generator(args, rt, model, tok, bank)
    start, opt_steps = run.resume(args, bank, opt)  # from RUN_DIR's checkpoint, else (0, 0)

    total_steps = args.steps or args.epochs * (len(train) // args.batch_prompts)
    G, shared = args.group_size, not (args.no_shared_prompt or model.is_gradient_checkpointing)
    hp = Hyper(args.eps_low, args.eps_high, args.tis_cap, args.loss_agg, args.max_new_tokens,
               args.temperature, args.grad_clip, args.micro_batch, args.micro_tokens,
               G if shared else 1, args.plain_logprobs, args.dual_clip)
    generator.push(bank)  # v = 0, or the resumed v
    if args.eval_n and start == 0:
        run.heldout(generator, tok, args, 0)
    bar = tqdm(range(start, total_steps), "grpo", total_steps, initial=start, disable=rt.rank > 0)
    for step in bar:
        t0 = time.time()
        # ---- data: the step's B prompts (this rank's share of each mini-batch), each G times
        full = task.batch_at(train, step, args.batch_prompts, args.seed, args.shuffle)  # × B
        mine = scale.shard(args.batch_prompts, rt.rank, rt.world, args.mini_batches)  # positions
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
        lrs = [task.lr_at(step, total_steps, args.lr, args.warmup)] * args.mini_batches
        ro = Rollouts(seqs, A, run.sampler_logprobs(comps))
        old_lp, stats = policy_update(model, opt, ro, lrs, hp)  # π_old (b·G, C)
        opt_steps, t_train = opt_steps + args.mini_batches, time.time() - t1

        # ---- sync: the generator gets W0 + ΔW for the next rollout
        t2 = time.time()
        kept = generator.push(bank)  # the share of ΔW it carries (a bf16 merge rounds some away)
        t_sync = time.time() - t2

        # ---- log (every rank's samples), then checkpoint; rank 0 writes
        r, comps, problems, old_lp = scale.gather_step(r, comps, problems, old_lp)
        row = dict(kind="train", step=step + 1, **run.step_metrics(
            r, G, comps, problems, old_lp, stats, args.tis_cap),
            v_norm=bank.v.norm().item(), v_checksum=scale.same_on_all_ranks(bank.v),
            delta_kept=kept, lr=lrs[-1], t_gen=t_gen, t_train=t_train, t_sync=t_sync,
            t_step=time.time() - t0)
        run.save_step(args, row, bank, opt, opt_steps)
        if rt.rank == 0:
            run.time_left(args.out, step + 1, start, total_steps, len(train) // args.batch_prompts)
            bar.set_postfix(reward=f"{row['reward']:.2f}", gap=f"{row['logp_absgap']:.1e}",
                            v=f"{row['v_norm']:.3f}")
            if args.sample_every and (step + 1) % args.sample_every == 0:
                bar.write(run.sample_text(step + 1, r[0], problems[0], comps[0]))
    return run.finish(args, bank, generator, tok, total_steps)

if __name__ == "__main__":
    run.run_cli(main)
