"""
Memory on a GPU: activation checkpointing of the loss pass, and the plan checked before any rollout.

Chosen where the paper is silent:
 1. On CUDA the loss pass checkpoints every decoder layer (--grad-checkpointing auto): transformers'
    layers, non-reentrant, which works with every weight frozen and v outside the model.
 2. The plan (weights + the generator's share + the largest micro-batch's activations + the lm-head
    chunk + headroom) is printed, and refused in one line when it cannot fit, before vLLM starts.
"""
import contextlib

import torch

HEAD_CHUNK_BYTES = 2 ** 30  # one lm-head chunk's fp32 logits (and their backward) stay under this
GIB = 2 ** 30


def set_checkpointing(model):
    """Recompute each decoder layer in backward instead of keeping its activations. transformers
    checkpoints only in training mode and then drops the KV cache, so the loss pass runs in train()
    (loss_mode) and unshared (G = 1); no dropout may run there."""
    cfg = model.config
    if getattr(cfg, "attention_dropout", 0.0) or getattr(cfg, "hidden_dropout", 0.0):
        raise ValueError("--grad-checkpointing runs the loss in train mode: no dropout allowed")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))


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


def check_memory(model, args, dev, checkpointing, backend):
    """Print the memory plan of a CUDA run and refuse, in one line, one that cannot fit."""
    total = torch.cuda.get_device_properties(dev).total_memory
    tokens = args.micro_batch * (args.max_prompt + args.max_new_tokens)
    share = args.gpu_memory_utilization * total if backend == "vllm" else 0
    text, fits = memory_plan(model, min(tokens, args.micro_tokens or tokens), checkpointing, share,
                             total)
    if not fits:
        raise ValueError(text + ": lower --micro-batch, --micro-tokens or "
                         "--gpu-memory-utilization, or use --grad-checkpointing on")
    return text


@contextlib.contextmanager
def loss_mode(model):
    """train() while a checkpointed model runs its loss pass (transformers checkpoints only in
    training mode; no dropout: checked by set_checkpointing), eval() otherwise and afterwards."""
    model.train(model.is_gradient_checkpointing)
    try:
        yield model
    finally:
        model.eval()
