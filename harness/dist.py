"""
Data parallelism under torchrun: every rank holds the frozen model and the same v, takes its share
of the step's prompts, and only v's gradient (u·groups floats) is summed. Without torchrun all of it
is a no-op, so the trainers call it unconditionally.

    torchrun --nproc-per-node 8 train_grpo.py --params 13

Chosen where the paper is silent:
 1. NCCL on CUDA (one GPU per LOCAL_RANK), gloo on CPU; a collective that waits past --dist-timeout
    (a dead or stuck rank) raises instead of hanging.
 2. A rank takes whole groups of every mini-batch (shard), so optimizer step m sums the gradient of
    exactly the prompts one process would use.
"""
import datetime
import os

import torch
import torch.distributed as dist


def init_distributed(device, timeout_s):
    """(rank, world size, device) from torchrun's environment; (0, 1, device) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), world, device


def rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(x):
    """Σ over ranks of a tensor (summed in place) or a number; x itself on one process."""
    if rank_world()[1] == 1:
        return x
    dev = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = x if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t if torch.is_tensor(x) else t.item()


def gather(items):
    """Every rank's list, concatenated in rank order, on every rank (pickled in memory by torch)."""
    if rank_world()[1] == 1:
        return list(items)
    out = [None] * rank_world()[1]
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def broadcast_(t):
    """Rank 0's values into t on every rank."""
    if rank_world()[1] > 1:
        dist.broadcast(t.data, 0)
    return t


def barrier():
    if rank_world()[1] > 1:
        dist.barrier()


def shard(n, rank, world, mini_batches):
    """This rank's positions among n prompts: its 1/world of each of the mini_batches consecutive
    slices, so every optimizer step sums the gradient of the same prompts as on one process."""
    if n % (mini_batches * world):
        raise ValueError(f"{n} prompts do not split into {mini_batches} mini-batches × {world} "
                         "ranks of whole groups")
    per = n // (mini_batches * world)
    return [m * n // mini_batches + rank * per + i for m in range(mini_batches) for i in range(per)]


def gather_step(r, comps, problems, old_lp):
    """Every rank's rewards (n,), completions, problems and π_old rows (n, C), in rank order."""
    if rank_world()[1] == 1:
        return r, comps, problems, old_lp
    parts = gather([(r[i].item(), c, p, old_lp[i, :len(c["ids"])].tolist())
                    for i, (c, p) in enumerate(zip(comps, problems))])
    old_lp = torch.zeros(len(parts), max(len(c["ids"]) for _, c, _, _ in parts))
    for i, (_, _, _, o) in enumerate(parts):
        old_lp[i, :len(o)] = torch.tensor(o)
    r = torch.tensor([x[0] for x in parts])
    return r, [x[1] for x in parts], [x[2] for x in parts], old_lp


def same_on_all_ranks(v):
    """v's checksum (Σ in fp64), after checking that every rank holds bit-identical values."""
    copies = gather([v.detach().cpu()])
    if any(not torch.equal(copies[0], c) for c in copies):
        worst = max((copies[0] - c).abs().max().item() for c in copies)
        raise RuntimeError(f"v differs across ranks: max |Δ| {worst:.3g}")
    return copies[0].double().sum().item()
