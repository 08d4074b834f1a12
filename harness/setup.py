"""
A trainer's start (train_grpo.py, harness/sft.py): runtime, data, model, adapter, memory plan,
config file, generator, optimizer and checkpoint, in an order where every bad input fails before
anything is written and before the generator takes its share of the GPU.
"""
import json
import os

import torch

import rollout
import task
import tinylora
from harness import checkpoint, dist, export, flags, memory
from harness.models import load_model, resolve_runtime


def setup(args, loaded=None):
    """(model, tok, bank, generator, training prompts, AdamW, start step, optimizer steps done).
    loaded: (model, tok, generator) already built with the same --model/--dtype/--backend (the
    sweep)."""
    dev, dtype, backend = resolve_runtime(args.device, args.dtype, args.backend)
    rank, world, dev = dist.init_distributed(dev, args.dist_timeout)
    ckpt = {"on": True, "off": False, "auto": dev.startswith("cuda")}[args.grad_checkpointing]
    resolved = dict(device=dev, dtype=str(dtype), backend=backend, world_size=world,
                    grad_checkpointing=ckpt)
    config = dict(vars(args), resolved=resolved)
    if rank == 0:
        print(flags.summary(config))
    rows, shots = task.load_task(args.data, "train", args.shots, args.val)
    model, tok = loaded[:2] if loaded else load_model(args.model, dtype=dtype, device=dev)
    bank = tinylora.apply_tinylora(model, r=args.r, tie=args.tie, targets=args.targets.split(","),
                                   seed=args.proj_seed, svd=args.svd, lora_xs=args.lora_xs,
                                   **flags.adapter_plan(args))
    bank.config["base_model"] = args.model
    if rank == 0:
        print(export.bank_plan(bank))
    if ckpt:
        memory.set_checkpointing(model)
    if dev.startswith("cuda") and not loaded:  # before the generator takes its share
        plan = memory.check_memory(model, args, dev, ckpt, backend)
        if rank == 0:
            print(plan)
    train = task.prompt_ids(tok, rows, shots, args.max_prompt)
    if len(train) < args.batch_prompts:
        raise ValueError(f"only {len(train)} training prompts fit in --max-prompt "
                         f"{args.max_prompt}, fewer than --batch-prompts {args.batch_prompts}")
    os.makedirs(args.out, exist_ok=True)
    if not args.resume and rank == 0:  # every resolved value, saved with the run (read by --resume)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            saved = {k: v for k, v in config.items() if k not in ("resume", "preset")}
            json.dump(saved, f, indent=1, default=str)
    generator = loaded[2] if loaded else rollout.make_generator(
        backend, model, tok, bank, args.model, args.out, dtype,
        args.max_prompt + args.max_new_tokens, args.seed, args.gpu_memory_utilization, args.sync,
        args.tensor_parallel)
    opt, start, opt_steps = resume(args, bank)
    if rank == 0:
        dropped = len(rows) - len(train)
        print(f"data: {len(train)} training prompts ({dropped} over {args.max_prompt} tokens "
              "dropped)" + (f"; resumed at step {start}" if start else "")
              + (f"; {world} ranks" if world > 1 else ""))
        checkpoint.recover_run(args.out, start)
    dist.barrier()
    return model, tok, bank, generator, train, opt, start, opt_steps


def resume(args, bank):
    """AdamW on v, and (start step, optimizer steps) from the run's checkpoint under --resume."""
    opt = torch.optim.AdamW([bank.v], lr=args.lr, betas=tuple(args.betas), weight_decay=0.0)
    path = os.path.join(args.out, "checkpoint.safetensors")
    done = (0, 0)
    if args.resume and os.path.isfile(path):
        done = checkpoint.load_checkpoint(path, bank, opt)
    dist.broadcast_(bank.v)  # every rank starts from rank 0's v (its checkpoint, on a shared --out)
    return opt, *done
