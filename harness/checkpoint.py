"""
Checkpoints and the run folder: v, the Adam moments and the step in one safetensors file (no
pickle), written atomically; the log; bringing a killed run back to its last checkpoint.

Chosen where the paper is silent:
 1. Data order and sampling are seeded per epoch/step, so v, the Adam state and the step are all an
    exact resume needs, on any number of ranks.
 2. A checkpoint is refused by a run whose adapter plan differs (rank, u, tying, P's seed, SVD,
    groups): the same v means nothing under another parameterisation.
"""
import glob
import json
import os

import torch

import tinylora
from harness.dist import rank_world

PLAN_KEYS = ("r", "u", "tie", "seed", "svd", "lora_xs", "group_sizes")


def save_checkpoint(path, bank, opt, step, opt_steps, args_dict):
    st = opt.state.get(bank.v, {})
    tensors = {"v": bank.v.detach().cpu().contiguous()}
    if st:
        tensors["exp_avg"] = st["exp_avg"].cpu().contiguous()
        tensors["exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
    meta = dict(step=step, opt_steps=opt_steps, adam_step=float(st["step"]) if st else 0.0,
                tinylora=bank.config, args=args_dict)
    tinylora.save_safetensors(tensors, path, "trainer", meta)


def save_run(out, bank, opt, step, opt_steps, args_dict):
    """After a step: the checkpoint (to resume) and the adapter (to use), each written
    atomically."""
    save_checkpoint(os.path.join(out, "checkpoint.safetensors"), bank, opt, step, opt_steps,
                    args_dict)
    tinylora.save_adapter(bank, os.path.join(out, "adapter.safetensors"),
                          base_model=args_dict.get("model"))


def load_checkpoint(path, bank, opt):
    """Restore v and the Adam state from `path`; returns (step, optimizer steps)."""
    t, meta = tinylora.read_safetensors(path, "trainer", "checkpoint")
    tinylora.check_fingerprint(meta["tinylora"]["fingerprint"], bank.config["fingerprint"], path)
    ours = {k: bank.config.get(k) for k in PLAN_KEYS}
    # files written before group_sizes was recorded are checked on the rest
    theirs = {k: meta["tinylora"].get(k, ours[k]) for k in PLAN_KEYS}
    if theirs != ours:
        diff = {k: (theirs[k], ours[k]) for k in PLAN_KEYS if theirs[k] != ours[k]}
        raise ValueError(f"{path}: the checkpoint's adapter plan differs from this run's "
                         f"(saved, now): {diff}")
    with torch.no_grad():
        bank.v.copy_(t["v"])
    if "exp_avg" in t:
        dev = bank.v.device
        opt.state[bank.v] = dict(step=torch.tensor(meta["adam_step"]), exp_avg=t["exp_avg"].to(dev),
                                 exp_avg_sq=t["exp_avg_sq"].to(dev))
    return meta["step"], meta["opt_steps"]


def append_jsonl(path, row):
    """Append one row; under torchrun only rank 0 writes."""
    if rank_world()[0] == 0:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def recover_run(out, step):
    """Bring a run folder back to its checkpoint's step: drop log rows past it (the log is written
    before the checkpoint) and temp files a kill tore (files are only ever renamed into place
    whole)."""
    for stale in glob.glob(os.path.join(out, "*.tmp*")):
        os.remove(stale)
    log_path = os.path.join(out, "log.jsonl")
    if os.path.isfile(log_path):
        rows = read_jsonl(log_path) if step else []
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= step)
