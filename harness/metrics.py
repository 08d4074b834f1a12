"""
The per-step log row of a GRPO run (reward, answers, lengths, the trainer-vs-sampler gap, TIS and
clip statistics) and the reward plot (skipped in one line without matplotlib).
"""
import torch

import task
from harness import checkpoint
from harness.batches import completion_mask


def step_metrics(r, G, comps, problems, old_lp, sampler_lp, stats, tis_cap):
    """r (N,) rewards in groups of G; old_lp, sampler_lp (N, C): the trainer's π_old and the
    sampler's."""
    n = torch.tensor([len(c["ids"]) for c in comps])
    mask = completion_mask(n, sampler_lp.shape[1]).bool()  # (N, C)
    gap, isw = (old_lp - sampler_lp)[mask], torch.exp(old_lp - sampler_lp)[mask]
    tokens = mask.sum().item()

    def frac(xs):
        return sum(xs) / len(comps)

    def right(extract):
        return frac(task.same_number(extract(c["text"]), p["gold"])
                    for c, p in zip(comps, problems))

    return dict(reward=r.mean().item(), reward_std=r.std().item(),
                hash_right=right(task.extract_strict), flexible=right(task.extract_flexible),
                frac_zero_std=(r.view(-1, G).std(1) == 0).float().mean().item(),
                len_mean=n.float().mean().item(), truncated=frac(not c["finished"] for c in comps),
                clip_low=stats["clip_low"] / tokens, clip_high=stats["clip_high"] / tokens,
                is_mean=isw.mean().item(), is_min=isw.min().item(), is_max=isw.max().item(),
                is_capped=(isw > tis_cap).float().mean().item(), logp_gap=gap.mean().item(),
                logp_absgap=gap.abs().mean().item(), grad_norm=stats["grad_norm"])


def sample_text(step, reward, problem, comp):
    head = f"--- step {step} sample (reward {reward:.0f}, gold {problem['gold']:g}):"
    return f"{head}\n{comp['text']}\n---"


def running_mean(xs, k):
    """Mean of the last k values at each point (fewer at the start): one step's reward depends
    mostly on which prompts it drew."""
    windows = [xs[max(0, i - k + 1):i + 1] for i in range(len(xs))]
    return [sum(w) / len(w) for w in windows]


def plot_rewards(log_path, out):
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed: no {out} (the numbers are in {log_path})")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = checkpoint.read_jsonl(log_path)
    tr = [r for r in rows if r["kind"] == "train"]
    ev = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, reward = [r["step"] for r in tr], [r["reward"] for r in tr]
    ax.plot(steps, reward, alpha=0.35, label="rollout reward (each step's prompts)")
    ax.plot(steps, running_mean(reward, 4), label="its mean over the last 4 steps")
    if ev:
        ax.plot([r["step"] for r in ev], [r["strict"] for r in ev], "o--",
                label="held-out strict (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
