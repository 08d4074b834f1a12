"""
The RL-versus-SFT report of one or more sweeps (harness/sweep.py's results.jsonl): per budget and
method the chosen learning rate, held-out strict accuracy over seeds (mean, min-max), each against
the base and RL against SFT on the same problems, what the scalars learned (the arithmetic account),
a markdown table and one figure.

    python -m harness.rl_vs_sft runs/rl-vs-sft/shots1 runs/rl-vs-sft/shots2 \
        --labels "1 shot,2 shots" --out docs/rl-vs-sft

Chosen here:
 1. Paired tests are exact McNemar tests on the same held-out problems, per seed (seed s of RL
    against seed s of SFT: the same data order). Pooled over seeds, the discordant pairs are summed
    into one test; as the seeds share their problems that p is optimistic, so the sign count (in how
    many seeds RL beats SFT) and the per-seed p stand beside it.
 2. The account (harness/account.py) is computed from every held-out reply: its base column is
    the untrained model's replies, its method columns the mean over seeds.
"""
import json
import os

import eval as evaluation
import task
from harness import config
from harness.files import read_jsonl
from harness.account import equation_account


def chosen(done, budget, method, lrs):
    """(lr, {seed: held-out row}) of a finished point: the lr by validation (ties: the smaller)."""
    val = {lr: done.get((f"{method}-{budget}-lr{lr:g}-s0", "val")) for lr in lrs}
    if None in val.values():
        return None, {}
    lr = max(sorted(lrs), key=lambda x: val[x]["strict"]["acc"])  # max keeps the first of equals
    rows = {r["seed"]: r for (name, split), r in done.items()
            if split == "test" and name.startswith(f"{method}-{budget}-lr{lr:g}-s")}
    return lr, rows


def paired(rows_a, rows_b, key="strict"):
    """McNemar of a against b per common seed, pooled (summed discordant pairs), and the sign count:
    dict(seeds=[(seed, a_only, b_only, p)], pooled_p, a_wins, b_wins)."""
    seeds = []
    for s in sorted(set(rows_a) & set(rows_b)):
        c = evaluation.compare(rows_b[s]["verdicts"], rows_a[s]["verdicts"], key)
        seeds.append((s, c["adapter_only"], c["base_only"], c["p_value"]))
    a_only, b_only = sum(x[1] for x in seeds), sum(x[2] for x in seeds)
    return dict(seeds=seeds, pooled_p=evaluation.mcnemar_exact(a_only, b_only),
                a_wins=sum(x[1] > x[2] for x in seeds), b_wins=sum(x[1] < x[2] for x in seeds))


def spread(rows, key="strict"):
    """(mean, min, max) of a metric's accuracy over seeds."""
    accs = [r[key]["acc"] for r in rows.values()]
    return sum(accs) / len(accs), min(accs), max(accs)


def accounts(rows, problems):
    """equation_account per seed, averaged; None when the rows hold no replies."""
    if not rows or any("reply" not in v for r in rows.values() for v in r["verdicts"]):
        return None
    each = [equation_account(problems, [v["reply"] for v in r["verdicts"]]) for r in rows.values()]
    return {k: sum(a[k] for a in each) / len(each) for k in ("copied", "right_equations")}


def results(out):
    """A sweep folder's results.jsonl keyed by (name, split); {} before its first point."""
    path = os.path.join(out, "results.jsonl")
    rows = read_jsonl(path) if os.path.isfile(path) else []
    return {(r["name"], r["split"]): r for r in rows}


def load(out):
    """(results keyed by (name, split), the sweep's settings) of a sweep folder."""
    return results(out), json.load(open(os.path.join(out, "sweep.json")))


def pct(x):
    return f"{x:.1%}"


def method_row(done, b, m, lrs, base, problems):
    """A table row: a method at a budget, its seeds against the base and its account."""
    lr, rows = chosen(done, b, m, lrs)
    val = ", ".join(f"{x:g}: {done[(f'{m}-{b}-lr{x:g}-s0', 'val')]['strict']['acc']:.0%}"
                    for x in lrs)
    mean, lo, hi = spread(rows)
    vs = paired(rows, {s: base for s in rows})
    per = ", ".join(f"{a}/{c} ({p:.2g})" for _, a, c, p in vs["seeds"])
    won = sum(a > c and p < 0.05 for _, a, c, p in vs["seeds"])
    acc = accounts(rows, problems)
    learned = f"{pct(acc['copied'])} | {pct(acc['right_equations'])}" if acc else " | "
    return (f"| {m.upper()} {b} | {next(iter(rows.values()))['params']} | **{lr:g}** ({val}) | "
            f"{pct(mean)} [{pct(lo)}, {pct(hi)}] | {len(rows)} | {per}; p = {vs['pooled_p']:.3g} "
            f"| {won} of {len(rows)} | {learned} |")


def verdict(pr, mean_rl, mean_sft, alpha=0.05):
    """The declared rule (docs/results.md): a method beats the other when its mean is higher, the
    pooled p < alpha and every seed agrees; otherwise the two are not distinguished."""
    n = len(pr["seeds"])
    if pr["pooled_p"] < alpha and mean_rl > mean_sft and pr["a_wins"] == n:
        return "RL beats SFT"
    if pr["pooled_p"] < alpha and mean_sft > mean_rl and pr["b_wins"] == n:
        return "SFT beats RL"
    return "not distinguished"


def contrast_holds(verdicts):
    """The paper's contrast on one prompt, from {params: verdict}: RL beats SFT at 13 parameters or
    fewer, and SFT does not beat RL there."""
    small = [v for n, v in verdicts.items() if n <= 13]
    return "RL beats SFT" in small and "SFT beats RL" not in small


def contrast_row(b, rl, sft):
    """(a row of the RL-against-SFT table at one budget, its verdict)."""
    pr, m_rl, m_sft = paired(rl, sft), spread(rl)[0], spread(sft)[0]
    per = ", ".join(f"{a}/{c} ({p:.3g})" for _, a, c, p in pr["seeds"])
    v = verdict(pr, m_rl, m_sft)
    return (f"| {b} | {next(iter(rl.values()))['params']} | {pct(m_rl)} | {pct(m_sft)} | {per} | "
            f"{pr['pooled_p']:.3g} | {pr['a_wins']} / {pr['b_wins']} | {v} |"), v


def table(done, cfg, label=""):
    """The markdown of one sweep: per budget and method its row, then RL against SFT."""
    base, lrs, first = done[("base", "test")], cfg["lrs"], cfg["first_run"]
    problems = task.load_task(first["data"], "test", first["shots"])[0][:base["n"]]
    acc = accounts({0: base}, problems)
    learned = f"{pct(acc['copied'])} | {pct(acc['right_equations'])}" if acc else " | "
    lines = [f"| {label} | params | lr (validation strict per lr) | held-out strict, mean [min, "
             "max] | seeds | vs base: gained/lost per seed (McNemar p); pooled p | seeds gaining, "
             "p < 0.05 | #### ≠ equation | right equations |",
             "| --- | ---: | --- | --- | --- | --- | --- | ---: | ---: |",
             f"| base | 0 | | {pct(base['strict']['acc'])} | | | | {learned} |"]
    contrast = ["", f"| {label} RL vs SFT | params | RL | SFT | RL-only / SFT-only right per seed "
                "(McNemar p) | pooled p | seeds RL > SFT / < | verdict |",
                "| --- | ---: | --- | --- | --- | ---: | --- | --- |"]
    verdicts = {}
    for b in cfg["budgets"]:
        rows = {m: chosen(done, b, m, lrs)[1] for m in cfg["methods"]}
        lines += [method_row(done, b, m, lrs, base, problems) for m in rows if rows[m]]
        if rows.get("rl") and rows.get("sft"):
            row, v = contrast_row(b, rows["rl"], rows["sft"])
            contrast.append(row)
            verdicts[next(iter(rows["rl"].values()))["params"]] = v
    if not verdicts:  # one method: no contrast to draw
        return "\n".join(lines) + "\n"
    contrast.append(f"\nThe paper's contrast (RL beats SFT at ≤ 13 parameters, SFT does not "
                    f"beat RL there){f' on {label}' if label else ''}: "
                    f"{'holds' if contrast_holds(verdicts) else 'does not hold'}.")
    return "\n".join(lines + contrast) + "\n"


def plot(sweeps, labels, path):
    """Held-out strict accuracy against trained parameters (log scale), RL and SFT, a panel per
    sweep: the mean over seeds with its min-max bar, the base as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 3.8), sharey=True,
                             squeeze=False)
    for ax, (done, cfg), label in zip(axes[0], sweeps, labels):
        ax.axhline(done[("base", "test")]["strict"]["acc"], ls="--", color="gray", label="base")
        for m, color in zip(cfg["methods"], ("C0", "C1")):
            pts = []
            for b in cfg["budgets"]:
                rows = chosen(done, b, m, cfg["lrs"])[1]
                if rows:
                    pts.append((next(iter(rows.values()))["params"], *spread(rows)))
            if pts:
                pts.sort()
                x, y = [p[0] for p in pts], [p[1] for p in pts]
                err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=color, label=m.upper())
        ax.set_xscale("log")
        ax.set_xlabel("trained parameters")
        ax.set_title(f"{label}: held-out strict (mean, min-max over seeds)")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = config.new_parser(__doc__.split("\n")[1])
    ap.add_argument("sweeps", nargs="+", help="sweep folders (each with results.jsonl)")
    ap.add_argument("--labels", default=None, help="comma-separated, one per sweep")
    ap.add_argument("--out", required=True, help="folder for table.md and accuracy.png")
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [os.path.basename(s) for s in args.sweeps]
    for s in args.sweeps:
        if not os.path.isfile(os.path.join(s, "results.jsonl")):
            raise ValueError(f"{s}: no results.jsonl (run python -m harness.sweep --out {s})")
    if len(labels) != len(args.sweeps):
        raise ValueError(f"--labels names {len(labels)} sweeps, {len(args.sweeps)} given")
    sweeps = [load(s) for s in args.sweeps]
    os.makedirs(args.out, exist_ok=True)
    text = "\n".join(table(d, c, lab) for (d, c), lab in zip(sweeps, labels))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    plot(sweeps, labels, os.path.join(args.out, "accuracy.png"))
    print(text)


if __name__ == "__main__":
    config.run_cli(main)
