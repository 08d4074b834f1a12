"""
SFT with TinyLoRA, the paper's baseline (§6, Figure 2): the same adapter and budget as
train_grpo.py, trained by next-token loss on gold solutions instead of by reward.

    python -m harness.sft --params 13 --preset cpu-demo     # SmolLM2-135M, arithmetic, a CPU
    python -m harness.sft --params 13                       # GSM8K, Qwen2.5-7B-Instruct (GPU)
    python -m harness.sft --resume runs/sft                  # continue exactly where it stopped

Flags, presets, data, checkpoints and --resume are train_grpo.py's (the sweep hands both trainers
the same flags; the rollout ones matter only for --eval-n, the PPO ones not at all), and so are its
build, loss pass and optimizer step. One step: the step's B problems
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

from tqdm import tqdm

import eval as evaluation
import task
import train_grpo as tg
from harness import config, models, run, scale


def nll_loss(logp, w):
    """−Σ w·log π over tokens: with w = agg_weights(mask, 'token-mean'), the mean token NLL."""
    return -(logp * w).sum()


def demos(tok, batch, eos):
    """(prompt ids, solution ids + EOS) per problem: the gold completion the model should write."""
    return [(p, tok(row["solution"], add_special_tokens=False)["input_ids"] + [eos])
            for row, p in batch]


def sft_update(model, opt, seqs, lrs, how, grad_clip):
    """One batch of demonstrations -> len(lrs) AdamW steps on v, one per mini-batch, through GRPO's
    loss passes (how: train_grpo.Pass, G = 1) and step; returns (mean NLL, last gradient norm)."""
    N, M = len(seqs), len(lrs)
    C = max(len(c) for _, c in seqs)
    mask = scale.length_mask([len(c) for _, c in seqs], C)  # (N, C): solution tokens
    total = grad_norm = 0.0
    for m, lr in enumerate(lrs):
        idx = list(range(m * N // M, (m + 1) * N // M))
        w = tg.agg_weights(mask[idx], "token-mean", C, scale.all_sum(mask[idx].sum().item()))
        opt.zero_grad(set_to_none=True)
        nll = 0.0
        lengths = [(len(seqs[i][0]), len(seqs[i][1])) for i in idx]
        with scale.loss_mode(model):
            for micro in scale.micro_batches(lengths, how.micro_batch, 1, how.micro_tokens):
                lp, _ = tg.logprobs(model, [seqs[idx[j]] for j in micro], how)
                loss = nll_loss(lp, w[micro, :lp.shape[1]].to(lp.device))
                loss.backward()
                nll += loss.item()
        total += scale.all_sum(nll) / M
        grad_norm = tg.step_v(opt, lr, grad_clip)
    return total, grad_norm


def main(argv=None, shared=None):
    args = config.trainer_args(argv, "SFT with TinyLoRA, the paper's baseline")
    if not args.eval_n and not shared:
        args.backend = "hf"  # nothing is sampled: no vLLM engine to start
    runtime, model, tok, bank, train, opt, generator, (start, opt_steps) = tg.build(args, shared)
    total_steps = args.steps or args.epochs * (len(train) // args.batch_prompts)
    eos = tok.eos_token_id if tok.eos_token_id is not None else models.eos_ids(model, tok)[0]
    how = tg.Pass(temperature=1.0, micro_batch=args.micro_batch, micro_tokens=args.micro_tokens,
                  G=1, plain=args.plain_logprobs, entropy=False)
    if args.eval_n and start == 0:
        generator.push(bank)
        run.log(args, evaluation.heldout(generator, tok, args, 0))
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="sft",
               disable=runtime.rank > 0)
    for step in bar:
        t0 = time.time()
        # ---- data: the step's B problems (GRPO's; this rank's share), their gold solutions
        batch = task.batch_at(train, step, args.batch_prompts, args.seed, args.shuffle)
        positions = scale.shard(args.batch_prompts, runtime.rank, runtime.world, args.mini_batches)
        seqs = demos(tok, [batch[i] for i in positions], eos)

        # ---- loss and step: token-mean NLL of the solutions through the unmerged adapter
        lrs = [task.lr_at(step, total_steps, args.lr, args.warmup)] * args.mini_batches
        loss, grad_norm = sft_update(model, opt, seqs, lrs, how, args.grad_clip)
        opt_steps += args.mini_batches

        # ---- log, then checkpoint (on resume, log records past the checkpoint are dropped)
        record = dict(kind="train", step=step + 1, loss=loss, grad_norm=grad_norm,
                      v_norm=bank.v.norm().item(), v_checksum=scale.same_on_all_ranks(bank.v),
                      lr=lrs[-1], tokens=scale.all_sum(sum(len(c) for _, c in seqs)),
                      t_step=time.time() - t0)
        run.save_step(args, record, bank, opt, opt_steps)
        if runtime.rank == 0:
            bar.set_postfix(loss=f"{loss:.3f}", v=f"{record['v_norm']:.3f}")
    if args.eval_n:
        generator.push(bank)
        run.log(args, evaluation.heldout(generator, tok, args, total_steps))
    return run.finish(args, bank, program="harness.sft")


if __name__ == "__main__":
    config.run_cli(main)
