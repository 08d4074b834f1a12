"""
A run's folder: config.json (every resolved value), the checkpoint (v, the Adam moments, the step:
one safetensors file, no pickle, written whole), log.jsonl (a record per step and per held-out
check), the adapter and reward.png; bringing a killed run back to its last checkpoint; a step's log
statistics and the run's end. The trainers call these (their flags: harness/config.py).

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
from tqdm import tqdm

import task
import tinylora
from harness import config, scale
from harness.export import bank_plan
from harness.files import append_jsonl, read_jsonl, write_atomic, write_json, write_jsonl
from harness.stats import mcnemar_exact


# ---- The run folder ------------------------------------------------------------------------
def start(args, rt, bank, problems, prompts):
    """After every check has passed: the plan on the console, the out folder, config.json (every
    resolved value; --resume reads it). problems: the training problems; prompts: those that
    fit."""
    if len(prompts) < args.batch_prompts:
        raise ValueError(f"only {len(prompts)} training prompts fit in --max-prompt "
                         f"{args.max_prompt}, fewer than --batch-prompts {args.batch_prompts}")
    bank.config["base_model"] = args.model
    os.makedirs(args.out, exist_ok=True)
    if rt.rank == 0:
        print(bank_plan(bank))
        ranks = f"; {rt.world} ranks" if rt.world > 1 else ""
        print(f"data: {len(prompts)} training prompts ({len(problems) - len(prompts)} over "
              f"{args.max_prompt} tokens dropped){ranks}")
    if not args.resume and rt.rank == 0:
        saved = {k: v for k, v in vars(args).items() if k not in ("resume", "preset")}
        write_json(os.path.join(args.out, "config.json"), dict(saved, resolved=config.resolved(rt)))


def resume(args, bank, opt):
    """(start step, optimizer steps done): from the run's checkpoint under --resume (v and the Adam
    moments restored, the log cut back to it), else (0, 0). Every rank starts from rank 0's v."""
    path = os.path.join(args.out, "checkpoint.safetensors")
    done = (0, 0)
    if args.resume and os.path.isfile(path):
        done = load_checkpoint(path, bank, opt)
        if scale.rank_world()[0] == 0:
            print(f"resumed at step {done[0]}")
    if scale.rank_world()[0] == 0:
        recover_run(args.out, done[0])
    scale.broadcast_(bank.v)
    scale.barrier()
    return done


def log(args, record):
    """Append one record (a step's, a held-out check's) to the run's log.jsonl; rank 0 writes."""
    if scale.rank_world()[0] == 0:
        append_jsonl(os.path.join(args.out, "log.jsonl"), record)


def save_step(args, record, bank, opt, opt_steps):
    """After a step: its log record, then (rank 0) the checkpoint and the adapter, written whole."""
    log(args, record)
    if scale.rank_world()[0] == 0:
        save_checkpoint(os.path.join(args.out, "checkpoint.safetensors"), bank, opt,
                        record["step"], opt_steps, vars(args))
        tinylora.save_adapter(bank, os.path.join(args.out, "adapter.safetensors"),
                              base_model=args.model)


def save_checkpoint(path, bank, opt, step, opt_steps, args_dict):
    st = opt.state.get(bank.v, {})
    tensors = {"v": bank.v.detach().cpu().contiguous()}
    if st:
        tensors["exp_avg"] = st["exp_avg"].cpu().contiguous()
        tensors["exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
    meta = dict(step=step, opt_steps=opt_steps, adam_step=float(st["step"]) if st else 0.0,
                tinylora=bank.config, args=args_dict)
    from safetensors.torch import save_file
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={
        "trainer": json.dumps(meta, default=str)}))


def load_checkpoint(path, bank, opt):
    """Restore v and the Adam state from `path`; returns (step, optimizer steps)."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            t, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["trainer"])
    except Exception as e:  # safetensors raises its own types for truncation and corruption
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})")
    tinylora.check_fingerprint(meta["tinylora"]["fingerprint"], bank.config["fingerprint"], path)
    keys, saved = tinylora.PLAN_KEYS, tinylora.saved_config(meta["tinylora"])
    ours = {k: bank.config.get(k) for k in keys}
    # files written before group_sizes was recorded are checked on the rest
    theirs = {k: saved.get(k, ours[k]) for k in keys}
    if theirs != ours:
        diff = {k: (theirs[k], ours[k]) for k in keys if theirs[k] != ours[k]}
        raise ValueError(f"{path}: the checkpoint's adapter plan differs from this run's "
                         f"(saved, now): {diff}")
    with torch.no_grad():
        bank.v.copy_(t["v"])
    if "exp_avg" in t:
        dev = bank.v.device
        opt.state[bank.v] = dict(step=torch.tensor(meta["adam_step"]), exp_avg=t["exp_avg"].to(dev),
                                 exp_avg_sq=t["exp_avg_sq"].to(dev))
    return meta["step"], meta["opt_steps"]


def recover_run(out, step):
    """Bring a run folder back to its checkpoint's step: drop log rows past it (the log is written
    before the checkpoint) and temp files a kill tore (files are only ever renamed into place
    whole)."""
    for stale in glob.glob(os.path.join(out, "*.tmp*")):
        os.remove(stale)
    log_path = os.path.join(out, "log.jsonl")
    if os.path.isfile(log_path):
        records = read_jsonl(log_path) if step else []
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records if r["step"] <= step)


# ---- The log: a step's row, the held-out check, the end of a run ------------------------------
def step_metrics(rewards, G, completions, problems, old_lp, stats, tis_cap):
    """A step's log statistics. rewards (N,) in groups of G; old_lp (N, C): the trainer's π_old,
    compared with each completion's sampler log-probs; with a KL or entropy term their token
    means (kl, entropy)."""
    n = torch.tensor([len(c["ids"]) for c in completions])
    mask = scale.length_mask(n, old_lp.shape[1]).bool()  # (N, C)
    sampler_lp = sampler_logprobs(completions, old_lp.shape[1])
    gap, isw = (old_lp - sampler_lp)[mask], torch.exp(old_lp - sampler_lp)[mask]
    tokens = mask.sum().item()

    def frac(xs):
        return sum(xs) / len(completions)

    def right(extract):
        return frac(task.same_number(extract(c["text"]), p["gold"])
                    for c, p in zip(completions, problems))

    return dict(reward=rewards.mean().item(), reward_std=rewards.std().item(),
                hash_right=right(task.extract_strict), flexible=right(task.extract_flexible),
                frac_zero_std=(rewards.view(-1, G).std(1) == 0).float().mean().item(),
                len_mean=n.float().mean().item(),
                truncated=frac(not c["finished"] for c in completions),
                clip_low=stats["clip_low"] / tokens, clip_high=stats["clip_high"] / tokens,
                is_mean=isw.mean().item(), is_min=isw.min().item(), is_max=isw.max().item(),
                is_capped=(isw > tis_cap).float().mean().item(), logp_gap=gap.mean().item(),
                logp_absgap=gap.abs().mean().item(), grad_norm=stats["grad_norm"],
                **{k: stats[k] / tokens for k in ("kl", "entropy") if k in stats})


def sampler_logprobs(completions, C=None):
    """The sampler's log-probs as a right-padded tensor (N, C), C: the longest completion."""
    out = torch.zeros(len(completions), C or max(len(c["ids"]) for c in completions))
    for i, c in enumerate(completions):
        out[i, :len(c["logprobs"])] = torch.tensor(c["logprobs"])
    return out


def time_left(out, step, start, total, per_epoch):
    """On the console, whether the run fits a booking: after this process's first step, the rest
    at that step's pace; after each epoch, the rest at the epoch's mean pace (t_step, log.jsonl)."""
    first = step == start + 1
    if step >= total or not (first or step % per_epoch == 0):
        return
    steps = [r for r in read_jsonl(os.path.join(out, "log.jsonl")) if r["kind"] == "train"]
    paces = [r["t_step"] for r in steps[-(1 if first else per_epoch):]]
    pace = sum(paces) / len(paces)
    left = (total - step) * pace
    what = (f"step {step} took {pace:.1f} s (a first step can be slower)" if first
            else f"epoch {step // per_epoch} done at {pace:.1f} s a step")
    tqdm.write(f"{what}: {total - step} steps left ≈ {int(left // 3600)} h "
               f"{int(left % 3600 // 60):02d} min")


def sample_text(step, reward, problem, comp):
    head = f"--- step {step} sample (reward {reward:.0f}, gold {problem['answer']}):"
    return f"{head}\n{comp['text']}\n---"


def before_after(first, last):
    """The console's account of a run from its first and last held-out rows (heldout's): the
    accuracy (strict, or the MATH reward's) before -> after, problems gained and lost with
    McNemar's p, and one problem the update turned from wrong to right, its reply before and
    after."""
    key = first.get("metric", "strict")
    gained = [i for i, (a, b) in enumerate(zip(first["right"], last["right"])) if b and not a]
    lost = sum(a and not b for a, b in zip(first["right"], last["right"]))
    text = (f"held-out {key} {first[key]:.1%} -> {last[key]:.1%}: {len(gained)} "
            f"gained, {lost} lost, McNemar p = {mcnemar_exact(len(gained), lost):.2g}")
    for i in gained[:1]:
        text += (f"\n  e.g. {last['questions'][i]}\n    before: {first['replies'][i]!r}"
                 f"\n    after:  {last['replies'][i]!r}")
    return text


def finish(args, bank, program="train_grpo.py"):
    """The end of a run (after its last held-out check): the adapter (also after resuming a
    finished run), the reward plot, the before/after account, where everything is, and the
    commands to run next with this run's paths."""
    log_path, adapter = (os.path.join(args.out, f) for f in ("log.jsonl", "adapter.safetensors"))
    if scale.rank_world()[0] == 0:
        tinylora.save_adapter(bank, adapter, base_model=args.model)
        plot = plot_rewards(log_path, os.path.join(args.out, "reward.png"))
        records = read_jsonl(log_path) if os.path.isfile(log_path) else []
        evals = [r for r in records if r["kind"] == "eval"]
        if len(evals) > 1:
            print(before_after(evals[0], evals[-1]))
        print(f"done: adapter {adapter} ({bank.v.numel()} parameters), log {log_path}"
              + (f", reward plot {plot}" if plot else ""))
        steps = max([r["step"] for r in records if r["kind"] == "train"], default=0)
        print(next_commands(args, adapter, program, 2 * steps or 1))
    scale.barrier()
    return bank


def next_commands(args, adapter, program, steps):
    """What to run next, as typed, with this run's paths; writes the serving example's requests
    (the first four held-out questions, asked of the base and of this adapter)."""
    requests = os.path.join(args.out, "requests.jsonl")
    questions = [p["question"] for p in task.load_task(args.data, "test", args.shots)[0][:4]]
    write_jsonl(requests, [dict(adapter=a, question=q) for q in questions
                           for a in ("base", "adapter")])
    run = "python -m harness.sft" if program.endswith("sft") else f"python {program}"
    return "\n".join([
        "next:",
        f"  python eval.py --adapter {adapter} --compare",
        f"  python -m harness.serve --adapters {adapter} --requests {requests} --out "
        f"{os.path.join(args.out, 'replies.jsonl')}",
        f"  python -m harness.export export-lora --adapter {adapter} --out "
        f"{os.path.join(args.out, 'lora')}",
        f"  python -m harness.export merge --adapter {adapter} --out "
        f"{os.path.join(args.out, 'merged')}",
        f"  {run} --resume {args.out} --steps {steps}"])


def running_mean(xs, k):
    """Mean of the last k values at each point (fewer at the start): one step's reward depends
    mostly on which prompts it drew."""
    windows = [xs[max(0, i - k + 1):i + 1] for i in range(len(xs))]
    return [sum(w) / len(w) for w in windows]


def plot_rewards(log_path, out):
    """reward.png from a GRPO log (its path), or None: no matplotlib, or no reward to plot."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed: no {out} (the numbers are in {log_path})")
        return None
    records = read_jsonl(log_path) if os.path.isfile(log_path) else []
    tr = [r for r in records if r["kind"] == "train" and "reward" in r]
    ev = [r for r in records if r["kind"] == "eval"]
    if not tr:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, reward = [r["step"] for r in tr], [r["reward"] for r in tr]
    ax.plot(steps, reward, alpha=0.35, label="rollout reward (each step's prompts)")
    ax.plot(steps, running_mean(reward, 4), label="its mean over the last 4 steps")
    if ev:
        key = ev[0].get("metric", "strict")  # the MATH reward's rows name their own metric
        ax.plot([r["step"] for r in ev], [r[key] for r in ev], "o--",
                label=f"held-out {key} (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
