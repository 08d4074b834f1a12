"""
How the update scales, with the numbers train_grpo.py computes (the fast pass's log-probs match
its plain pass to round-off, 1e-5 in fp32: tested):
 - out, under torchrun: every rank holds the frozen model and the same v, takes its share of the
   step's prompts, and only v's gradient (u·groups floats) is summed; without torchrun all of it is
   a no-op, so the trainers call it unconditionally;
 - through memory: micro-batches of whole groups, activation checkpointing on CUDA, the lm-head in
   chunks, and the memory plan checked before the generator takes its share of the card;
 - and faster: token_logprobs gives train_grpo.token_logprobs's numbers (tested) with each prompt
   run once per group of G samples, the prefix every prompt shares once, and completions in runs
   of similar length.

Chosen where the paper is silent:
 1. NCCL on CUDA (one GPU per LOCAL_RANK), gloo on CPU; a collective that waits past
    --dist-timeout (a dead or stuck rank) raises instead of hanging.
 2. A rank takes whole groups of every mini-batch (shard), so optimizer step m sums the gradient of
    exactly the prompts one process would use.
 3. On CUDA the loss pass checkpoints every decoder layer (--grad-checkpointing auto): transformers'
    layers, non-reentrant, which works with every weight frozen and v outside the model.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute

HEAD_CHUNK_BYTES = 2 ** 30  # one lm-head chunk's fp32 logits (and their backward) stay under this
GIB = 2 ** 30


# ---- Out: torchrun data parallelism -------------------------------------------------------------
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


# ---- Through memory: micro-batches, activation checkpointing, the plan --------------------------
def micro_batches(lengths, micro_batch, G=1, max_tokens=0):
    """Split positions 0..len(lengths)-1 (G consecutive samples per group) into micro-batches of
    whole groups: at most max(micro_batch, G) samples and, if max_tokens, about that many padded
    tokens. Groups go longest first, so each pass pads to lengths close to its own. lengths: (Lp, C)
    each."""
    def longest(s):
        return -max(sum(lengths[i]) for i in range(s, s + G))

    out, cur = [], []
    for s in sorted(range(0, len(lengths), G), key=longest):
        nxt = cur + list(range(s, s + G))
        Lp, C = max(lengths[i][0] for i in nxt), max(lengths[i][1] for i in nxt)
        tokens = len(nxt) // G * Lp + len(nxt) * C if G > 1 else len(nxt) * (Lp + C)
        if cur and (len(nxt) > micro_batch or max_tokens and tokens > max_tokens):
            out.append(cur)
            nxt = list(range(s, s + G))
        cur = nxt
    return out + [cur]


def use_checkpointing(setting, device):
    """--grad-checkpointing on | off | auto (on with CUDA)."""
    return {"on": True, "off": False, "auto": device.startswith("cuda")}[setting]


def set_checkpointing(model):
    """Recompute each decoder layer in backward instead of keeping its activations. transformers
    checkpoints only in training mode and then drops the KV cache, so the loss pass runs in train()
    (loss_mode) and unshared (G = 1); no dropout may run there."""
    cfg = model.config
    if getattr(cfg, "attention_dropout", 0.0) or getattr(cfg, "hidden_dropout", 0.0):
        raise ValueError("--grad-checkpointing runs the loss in train mode: no dropout allowed")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))


@contextlib.contextmanager
def loss_mode(model):
    """train() while a checkpointed model runs its loss pass (transformers checkpoints only in
    training mode; no dropout: checked by set_checkpointing), eval() otherwise and afterwards."""
    model.train(model.is_gradient_checkpointing)
    try:
        yield model
    finally:
        model.eval()


def activation_bytes(H, I, layers, tokens, dtype_bytes, checkpointing):
    """Estimated autograd memory of a loss pass over `tokens` tokens: ~(10 H + 3 I) saved elements
    per token and layer (92.7k at the 7B shape, where a review measured 87.5k; tiny shapes count
    1.4-2.4× more, and the test holds the estimate within 0.3-1.5× of its count); with checkpointing
    only each layer's input H is kept, plus one layer's activations while it is recomputed."""
    per_layer = (10 * H + 3 * I) * dtype_bytes * tokens
    return layers * H * dtype_bytes * tokens + per_layer if checkpointing else layers * per_layer


def memory_plan(model, tokens, checkpointing, generator_bytes, total_bytes, headroom=GIB):
    """(text, fits): the model, the generator's share, the activations and the lm-head chunk against
    the card's memory."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    act = activation_bytes(c.hidden_size, c.intermediate_size, c.num_hidden_layers, tokens,
                           next(model.parameters()).element_size(), checkpointing)
    head = 3 * HEAD_CHUNK_BYTES
    need = weights + generator_bytes + act + head + headroom
    on = "on" if checkpointing else "off"
    text = (f"memory plan: weights {weights / GIB:.1f} GiB + generator {generator_bytes / GIB:.1f} "
            f"GiB + activations {act / GIB:.1f} GiB ({tokens} tokens, checkpointing {on}) + "
            f"lm-head {head / GIB:.0f} GiB + {headroom / GIB:.0f} GiB headroom = "
            f"{need / GIB:.1f} of {total_bytes / GIB:.1f} GiB")
    return text, need <= total_bytes


def prepare_memory(model, args, rt, plan=True):
    """Activation checkpointing as resolved; on CUDA (plan) the memory plan printed, and refused in
    one line when it cannot fit: before the generator takes its share."""
    if rt.grad_checkpointing:
        set_checkpointing(model)
    if not (plan and rt.device.startswith("cuda")):
        return
    total = torch.cuda.get_device_properties(rt.device).total_memory
    tokens = args.micro_batch * (args.max_prompt + args.max_new_tokens)
    share = args.gpu_memory_utilization * total if rt.backend == "vllm" else 0
    text, fits = memory_plan(model, min(tokens, args.micro_tokens or tokens), rt.grad_checkpointing,
                             share, total)
    if not fits:
        raise ValueError(text + ": lower --micro-batch, --micro-tokens or "
                         "--gpu-memory-utilization, or use --grad-checkpointing on")
    if rt.rank == 0:
        print(text)


# ---- Faster: the shared-prompt pass and the chunked lm-head ------------------------------------
def length_mask(lengths, T):
    """(N, T) float: 1 on each row's first lengths[i] positions, 0 on its right padding."""
    return (torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]).float()


def left_pad(seqs, length, pad=0):
    """ids and mask (b, length), each sequence right-aligned after `pad` ids."""
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, length - len(s):] = 1
    return ids, mask


def length_runs(lengths, ratio=1.5):
    """Positions sorted by length, cut into runs whose longest is at most `ratio` × their shortest:
    a run pads only to its own longest, so one cut-off sample no longer pads every other."""
    runs = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if runs and lengths[i] <= ratio * max(1, lengths[runs[-1][0]]):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def head_logprobs(model, h, y, temperature, chunk=None, entropy=False):
    """log π(y) (b, c) from hidden states h (b, c, H) that predict y (b, c); entropy: with each
    position's entropy H(π) beside it, (b, c, 2). The vocabulary projection is recomputed in
    backward per time chunk, so the (b, c, vocab) logits never exist at once."""
    head = model.get_output_embeddings()
    chunk = chunk or max(1, HEAD_CHUNK_BYTES // (h.shape[0] * head.weight.shape[0] * 4))

    def lp(hc, yc):
        logp = (head(hc).float() / temperature).log_softmax(-1)  # (b, c, vocab)
        if not entropy:
            return logp.gather(-1, yc[..., None])[..., 0]
        return torch.cat([logp.gather(-1, yc[..., None]),
                          -(logp.exp() * logp).sum(-1, keepdim=True)], -1)

    return torch.cat([recompute(lp, h[:, s:s + chunk], y[:, s:s + chunk], use_reentrant=False)
                      for s in range(0, y.shape[1], chunk)], 1)


def pad_time(x, T):
    """x (b, t, ...) right-padded with zeros to (b, T, ...)."""
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, T - x.shape[1]))


def token_logprobs(model, seqs, temperature, G=1, entropy=False):
    """train_grpo.token_logprobs's numbers, with less memory and work: (b, C) right-padded, with
    grad (entropy: and each position's entropy, a pair). G = 1: one pass over each left-padded
    prompt + completion, the lm-head in chunks. G > 1: groups of G share a prompt, which runs once
    (with grad: v changes its keys and values too), its prefix common to all prompts once for all;
    its G completions run on its KV cache, in runs of similar lengths: (Lp + G·C)/(G·(Lp + C)) of
    the work, less the padding."""
    from transformers import DynamicCache
    dev = next(model.parameters()).device
    Lp, C = max(len(p) for p, _ in seqs), max(len(c) for _, c in seqs)
    y = torch.tensor([c + [0] * (C - len(c)) for _, c in seqs], device=dev)  # (b, C) completion ids
    cmask = length_mask([len(c) for _, c in seqs], C).long().to(dev)  # (b, C)
    if G == 1:
        ids, mask = left_pad([p + c + [0] * (C - len(c)) for p, c in seqs], Lp + C)
        ids, mask = ids.to(dev), mask.to(dev)
        mask[:, Lp:] = cmask
        pos = (mask.cumsum(1) - 1).clamp_min(0)  # position ids that skip the left padding
        h = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        out = head_logprobs(model, h[:, Lp - 1:Lp + C - 1], y, temperature, entropy=entropy)
        return out.unbind(-1) if entropy else out
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
        out = head_logprobs(model, h, y[part, :Cr], temperature, entropy=entropy)
        lps.append(pad_time(out, C))  # (n, C) or (n, C, 2)
    order = torch.tensor([i for part in parts for i in part], device=dev)
    out = torch.cat(lps)[torch.argsort(order)]  # (b, C), back in the order of seqs
    return out.unbind(-1) if entropy else out


def prompt_pass(model, prompts, dev):
    """The prompts' forward with grad, for their completions to run on: per-layer keys and values
    (g, heads, Lp, d), the mask over them (g, Lp) and the last prompt token's state (g, 1, H). The
    prefix every prompt shares (system prompt, shots) runs once, its cache repeated g times."""
    from transformers import DynamicCache
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
