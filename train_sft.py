"""
SFT with TinyLoRA, the paper's baseline (§6, Figure 2): the same adapter and budget as train_grpo.py,
trained by next-token loss on gold solutions instead of by reward.

    python train_sft.py --params 13 --preset cpu-demo     # SmolLM2-135M, arithmetic, ~1 min on a 2-core CPU
    python train_sft.py --params 13                       # GSM8K, Qwen2.5-7B-Instruct (GPU)
    python train_sft.py --resume runs/sft                  # continue a run exactly where it stopped

Flags, presets, data, checkpoints and --resume are train_grpo.py's (its rollout flags only matter for
--eval-n). One step: the step's B problems (the same ones GRPO sees at that step, batch_at) -> each
problem's gold solution + EOS as the completion -> token-mean negative log-likelihood through the
unmerged adapter -> AdamW step(s) on v -> log + checkpoint.

Chosen where the paper is silent:
 1. "Same examples seen" as GRPO: the same B problems per step, the same steps and optimizer steps
    (--mini-batches); GRPO sees G sampled answers per problem, SFT its one gold solution.
 2. Loss on the solution tokens only (the prompt is context), averaged over tokens (verl's token-mean);
    log-probs at temperature 1. The target is task.py's solution: GSM8K's answer without <<calc>>
    annotations, or "a + b = c.\\n#### c" for arith: the format the reward asks for.
"""
import functools
import os
import time

import torch

import engine
import eval as evaluation
import task
import tinylora
import train_grpo as tg


def nll_loss(logp, w):
    """−Σ w·log π over tokens: with w = agg_weights(mask, 'token-mean') the mean token NLL. logp, w (b, c)."""
    return -(logp * w).sum()


def demos(tok, batch, eos):
    """(prompt ids, solution ids + EOS) per problem: the gold completion the model should write."""
    return [(p, tok(row["solution"], add_special_tokens=False)["input_ids"] + [eos]) for row, p in batch]


def sft_update(model, bank, opt, seqs, lrs, micro_batch, grad_clip, max_tokens=0):
    """One batch of demonstrations -> len(lrs) AdamW steps on v, one per mini-batch; returns (mean NLL, grad norm)."""
    N, M = len(seqs), len(lrs)
    C = max(len(c) for _, c in seqs)
    mask = engine.completion_mask([len(c) for _, c in seqs], C)  # (N, C)
    total = grad_norm = 0.0
    for m, lr in enumerate(lrs):
        rows = list(range(m * N // M, (m + 1) * N // M))
        W = tg.agg_weights(mask[rows], "token-mean", C, engine.all_sum(mask[rows].sum().item()))  # (len(rows), C)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        lengths = [(len(seqs[i][0]), len(seqs[i][1])) for i in rows]
        with engine.loss_mode(model):  # train() under checkpointing, as GRPO's loss pass
            for mb in engine.micro_batches(lengths, micro_batch, 1, max_tokens):
                lp = tg.token_logprobs(model, [seqs[rows[j]] for j in mb], 1.0)  # (b, c)
                loss = nll_loss(lp, W[mb, :lp.shape[1]].to(lp.device))
                loss.backward()
                total += engine.all_sum(loss.item()) / M
        engine.all_sum(bank.v.grad)  # torchrun: the gradient of every rank's share of the mini-batch
        grad_norm = torch.nn.utils.clip_grad_norm_([bank.v], grad_clip).item()
        opt.step()
    return total, grad_norm


def main(argv=None, loaded=None):
    args = tg.get_args(argv)
    if not args.eval_n and not loaded:
        args.backend = "hf"  # nothing is sampled: no vLLM engine to start
    model, tok, bank, gen, train, opt, start, opt_steps = engine.setup(args, loaded)
    total_steps = args.steps or args.epochs * (len(train) // args.batch_prompts)
    total_opt, out = total_steps * args.mini_batches, functools.partial(os.path.join, args.out)
    eos = tok.eos_token_id if tok.eos_token_id is not None else engine.eos_ids(model, tok)[0]
    if args.eval_n and start == 0:
        gen.push(bank)
        engine.append_jsonl(out("log.jsonl"), evaluation.heldout(gen, tok, args, 0))
    rank, world = engine.rank_world()
    from tqdm import tqdm
    for step in (bar := tqdm(range(start, total_steps), initial=start, total=total_steps, desc="sft", disable=rank > 0)):
        t0 = time.time()
        # ---- data: the step's B problems (GRPO's at this step; under torchrun this rank's share), gold solutions
        batch = task.batch_at(train, step, args.batch_prompts, args.seed)
        seqs = demos(tok, [batch[i] for i in engine.shard(args.batch_prompts, rank, world, args.mini_batches)], eos)

        # ---- loss and step: token-mean NLL of the solutions through the unmerged adapter
        lrs = [task.lr_at(opt_steps + m, total_opt, args.lr, args.warmup) for m in range(args.mini_batches)]
        loss, grad_norm = sft_update(model, bank, opt, seqs, lrs, args.micro_batch, args.grad_clip, args.micro_tokens)
        opt_steps += args.mini_batches

        # ---- log, then checkpoint (on resume, log rows past the checkpoint are dropped)
        row = dict(kind="train", step=step + 1, loss=loss, grad_norm=grad_norm, v_norm=bank.v.norm().item(),
                   v_checksum=engine.same_on_all_ranks(bank.v), lr=lrs[-1],
                   tokens=engine.all_sum(sum(len(c) for _, c in seqs)), t_step=time.time() - t0)
        engine.append_jsonl(out("log.jsonl"), row)
        if rank > 0:
            continue
        engine.save_checkpoint(out("checkpoint.safetensors"), bank, opt, step + 1, opt_steps, vars(args))
        bar.set_postfix(loss=f"{loss:.3f}", v=f"{row['v_norm']:.3f}")

    if args.eval_n:
        gen.push(bank)
        engine.append_jsonl(out("log.jsonl"), evaluation.heldout(gen, tok, args, total_steps))
    if rank == 0:
        tinylora.save_adapter(bank, out("adapter.safetensors"), base_model=args.model)
        print(f"done: adapter {out('adapter.safetensors')} ({bank.num_params()} parameters)")
    engine.barrier()
    return bank


if __name__ == "__main__":
    engine.run_cli(main)
