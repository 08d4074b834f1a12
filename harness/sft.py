"""
SFT with TinyLoRA, the paper's baseline (§6, Figure 2): the same adapter and budget as
train_grpo.py, trained by next-token loss on gold solutions instead of by reward.

    python -m harness.sft --params 13 --preset cpu-demo     # SmolLM2-135M, arithmetic, a CPU
    python -m harness.sft --params 13                       # GSM8K, Qwen2.5-7B-Instruct (GPU)
    python -m harness.sft --resume runs/sft                  # continue exactly where it stopped

Flags, presets, data, checkpoints and --resume are train_grpo.py's (its rollout flags matter only
for --eval-n), and so are its loss passes and optimizer step. One step: the step's B problems (the
ones GRPO sees at that step) -> each problem's gold solution + EOS as the completion -> token-mean
negative log-likelihood through the unmerged adapter -> AdamW step(s) on v -> log + checkpoint.

Chosen where the paper is silent:
 1. "Same examples seen" as GRPO: the same B problems per step, the same steps and optimizer steps
    (--mini-batches); GRPO sees G sampled answers per problem, SFT its one gold solution.
 2. Loss on the solution tokens only (the prompt is context), averaged over tokens (verl's
    token-mean); log-probs at temperature 1. The target is task.py's solution: GSM8K's answer
    without <<calc>> annotations, or "a + b = c.\n#### c" for arith (the reward's format).
"""
import functools
import os
import time

import eval as evaluation
import task
import tinylora
import train_grpo as tg
from harness import checkpoint, dist, flags
from harness.models import eos_ids
from harness.setup import setup


def nll_loss(logp, w):
    """−Σ w·log π over tokens: with w = agg_weights(mask, 'token-mean'), the mean token NLL."""
    return -(logp * w).sum()


def demos(tok, batch, eos):
    """(prompt ids, solution ids + EOS) per problem: the gold completion the model should write."""
    return [(p, tok(row["solution"], add_special_tokens=False)["input_ids"] + [eos])
            for row, p in batch]


def sft_update(model, bank, opt, seqs, lrs, micro_batch, grad_clip, max_tokens=0):
    """One batch of demonstrations -> len(lrs) AdamW steps on v, one per mini-batch, through GRPO's
    loss passes and step; returns (mean NLL, the last gradient norm)."""
    N, M = len(seqs), len(lrs)
    C = max(len(c) for _, c in seqs)
    mask = tg.completion_mask([len(c) for _, c in seqs], C)  # (N, C)
    total = grad_norm = 0.0
    for m, lr in enumerate(lrs):
        idx = list(range(m * N // M, (m + 1) * N // M))
        w = tg.agg_weights(mask[idx], "token-mean", C, dist.all_sum(mask[idx].sum().item()))
        opt.zero_grad(set_to_none=True)
        nll = 0.0
        for mb, lp in tg.loss_passes(model, seqs, idx, 1.0, micro_batch, 1, max_tokens):
            loss = nll_loss(lp, w[mb, :lp.shape[1]].to(lp.device))
            loss.backward()
            nll += loss.item()
        total += dist.all_sum(nll) / M
        grad_norm = tg.step_v(opt, bank, lr, grad_clip)
    return total, grad_norm


def main(argv=None, loaded=None):
    from tqdm import tqdm
    args = tg.get_args(argv)
    if not args.eval_n and not loaded:
        args.backend = "hf"  # nothing is sampled: no vLLM engine to start
    model, tok, bank, generator, train, opt, start, opt_steps = setup(args, loaded)
    total_steps = args.steps or args.epochs * (len(train) // args.batch_prompts)
    out = functools.partial(os.path.join, args.out)
    eos = tok.eos_token_id if tok.eos_token_id is not None else eos_ids(model, tok)[0]
    if args.eval_n and start == 0:
        generator.push(bank)
        checkpoint.append_jsonl(out("log.jsonl"), evaluation.heldout(generator, tok, args, 0))
    rank, world = dist.rank_world()
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="sft",
               disable=rank > 0)
    for step in bar:
        t0 = time.time()
        # ---- data: the step's B problems (GRPO's; this rank's share), their gold solutions
        batch = task.batch_at(train, step, args.batch_prompts, args.seed)
        mine = dist.shard(args.batch_prompts, rank, world, args.mini_batches)
        seqs = demos(tok, [batch[i] for i in mine], eos)

        # ---- loss and step: token-mean NLL of the solutions through the unmerged adapter
        lrs = [task.lr_at(opt_steps + m, total_steps * args.mini_batches, args.lr, args.warmup)
               for m in range(args.mini_batches)]
        loss, grad_norm = sft_update(model, bank, opt, seqs, lrs, args.micro_batch, args.grad_clip,
                                     args.micro_tokens)
        opt_steps += args.mini_batches

        # ---- log, then checkpoint (on resume, log rows past the checkpoint are dropped)
        row = dict(kind="train", step=step + 1, loss=loss, grad_norm=grad_norm,
                   v_norm=bank.v.norm().item(), v_checksum=dist.same_on_all_ranks(bank.v),
                   lr=lrs[-1], tokens=dist.all_sum(sum(len(c) for _, c in seqs)),
                   t_step=time.time() - t0)
        checkpoint.append_jsonl(out("log.jsonl"), row)
        if rank == 0:
            checkpoint.save_checkpoint(out("checkpoint.safetensors"), bank, opt, step + 1,
                                       opt_steps, vars(args))
            bar.set_postfix(loss=f"{loss:.3f}", v=f"{row['v_norm']:.3f}")
    if args.eval_n:
        generator.push(bank)
        checkpoint.append_jsonl(out("log.jsonl"),
                                evaluation.heldout(generator, tok, args, total_steps))
    if rank == 0:
        tinylora.save_adapter(bank, out("adapter.safetensors"), base_model=args.model)
        print(f"done: adapter {out('adapter.safetensors')} ({bank.num_params()} parameters)")
    dist.barrier()
    return bank


if __name__ == "__main__":
    flags.run_cli(main)
