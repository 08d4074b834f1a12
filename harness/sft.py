"""
SFT with TinyLoRA, the paper's baseline (§6, Figure 2): the same adapter and budget as
train_grpo.py, trained by next-token loss on gold solutions instead of by reward.

    python -m harness.sft --params 13 --preset cpu-demo     # SmolLM2-135M, arithmetic, a CPU
    python -m harness.sft --params 13                       # GSM8K, Qwen2.5-7B-Instruct (GPU)
    python -m harness.sft --resume runs/sft                  # continue exactly where it stopped

Flags, presets, data, checkpoints and --resume are train_grpo.py's (its rollout flags matter only
for --eval-n), and so are its build, loss pass and optimizer step. One step: the step's B problems
(the ones GRPO sees at that step) -> each problem's gold solution + EOS as the completion ->
token-mean negative log-likelihood through the unmerged adapter -> AdamW step(s) on v -> log +
checkpoint.

Chosen where the paper is silent:
 1. "Same examples seen" as GRPO: the same B problems per step, the same steps and optimizer steps
    (--mini-batches); GRPO sees G sampled answers per problem, SFT its one gold solution.
 2. Loss on the solution tokens only (the prompt is context), averaged over tokens (verl's
    token-mean); log-probs at temperature 1. The target is task.py's solution: GSM8K's answer
    without <<calc>> annotations, or "a + b = c.\n#### c" for arith (the reward's format).
"""
import time

import torch
from tqdm import tqdm

import task
import tinylora
import train_grpo as tg
from harness import models, run, scale


def nll_loss(logp, w):
    """−Σ w·log π over tokens: with w = agg_weights(mask, 'token-mean'), the mean token NLL."""
    return -(logp * w).sum()


def demos(tok, batch, eos):
    """(prompt ids, solution ids + EOS) per problem: the gold completion the model should write."""
    return [(p, tok(row["solution"], add_special_tokens=False)["input_ids"] + [eos])
            for row, p in batch]


def sft_update(model, opt, seqs, lrs, hp):
    """One batch of demonstrations -> len(lrs) AdamW steps on v, one per mini-batch, through GRPO's
    loss passes and step (hp: train_grpo.Hyper, G = 1); returns (mean NLL, last gradient norm)."""
    N, M = len(seqs), len(lrs)
    C = max(len(c) for _, c in seqs)
    mask = scale.completion_mask([len(c) for _, c in seqs], C)  # (N, C)
    total = grad_norm = 0.0
    for m, lr in enumerate(lrs):
        idx = list(range(m * N // M, (m + 1) * N // M))
        w = tg.agg_weights(mask[idx], "token-mean", C, scale.all_sum(mask[idx].sum().item()))
        opt.zero_grad(set_to_none=True)
        nll = 0.0
        lengths = [(len(seqs[i][0]), len(seqs[i][1])) for i in idx]
        with scale.loss_mode(model):
            for mb in scale.micro_batches(lengths, hp.micro_batch, 1, hp.micro_tokens):
                lp = tg.logprobs(model, [seqs[idx[j]] for j in mb], hp)
                loss = nll_loss(lp, w[mb, :lp.shape[1]].to(lp.device))
                loss.backward()
                nll += loss.item()
        total += scale.all_sum(nll) / M
        grad_norm = tg.step_v(opt, lr, hp.grad_clip)
    return total, grad_norm


def main(argv=None, loaded=None):
    args = tg.get_args(argv)
    if not args.eval_n and not loaded:
        args.backend = "hf"  # nothing is sampled: no vLLM engine to start
    rt = models.runtime(args.device, args.dtype, args.backend, args.dist_timeout,
                        args.grad_checkpointing, args.batch_invariant)
    run.print_config(args, rt)
    rows, shots = task.load_task(args.data, "train", args.shots, args.val)
    model, tok = loaded[:2] if loaded else models.load_model(args.model, rt.dtype, rt.device)
    bank = tinylora.apply_tinylora(model, **run.adapter_kwargs(args))
    scale.fit(model, args, rt, plan=not loaded)
    train = task.prompt_ids(tok, rows, shots, args.max_prompt)
    run.start(args, rt, bank, rows, train)
    opt = torch.optim.AdamW([bank.v], lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay)
    generator = loaded[2] if loaded else tg.make_generator(args, rt, model, tok, bank)
    start, opt_steps = run.resume(args, bank, opt)
    total_steps = args.steps or args.epochs * (len(train) // args.batch_prompts)
    eos = tok.eos_token_id if tok.eos_token_id is not None else models.eos_ids(model, tok)[0]
    hp = tg.Hyper(args.eps_low, args.eps_high, args.tis_cap, "token-mean", args.max_new_tokens,
                  1.0, args.grad_clip, args.micro_batch, args.micro_tokens, 1, args.plain_logprobs)
    if args.eval_n and start == 0:
        generator.push(bank)
        run.heldout(generator, tok, args, 0)
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="sft",
               disable=rt.rank > 0)
    for step in bar:
        t0 = time.time()
        # ---- data: the step's B problems (GRPO's; this rank's share), their gold solutions
        batch = task.batch_at(train, step, args.batch_prompts, args.seed, args.shuffle)
        mine = scale.shard(args.batch_prompts, rt.rank, rt.world, args.mini_batches)
        seqs = demos(tok, [batch[i] for i in mine], eos)

        # ---- loss and step: token-mean NLL of the solutions through the unmerged adapter
        lrs = [task.lr_at(step, total_steps, args.lr, args.warmup)] * args.mini_batches
        loss, grad_norm = sft_update(model, opt, seqs, lrs, hp)
        opt_steps += args.mini_batches

        # ---- log, then checkpoint (on resume, log rows past the checkpoint are dropped)
        row = dict(kind="train", step=step + 1, loss=loss, grad_norm=grad_norm,
                   v_norm=bank.v.norm().item(), v_checksum=scale.same_on_all_ranks(bank.v),
                   lr=lrs[-1], tokens=scale.all_sum(sum(len(c) for _, c in seqs)),
                   t_step=time.time() - t0)
        run.save_step(args, row, bank, opt, opt_steps)
        if rt.rank == 0:
            bar.set_postfix(loss=f"{loss:.3f}", v=f"{row['v_norm']:.3f}")
    if args.eval_n:
        generator.push(bank)
    return run.finish(args, bank, generator, tok, total_steps)


if __name__ == "__main__":
    run.run_cli(main)
