"""
A run: its config (the flags over a preset or a resumed run's config.json, checked; one-line errors)
and its folder: config.json, the checkpoint (v, the Adam moments, the step: one safetensors file,
no pickle, written whole), log.jsonl (a row per step and per held-out check), the adapter and
reward.png; bringing a killed run back to its last checkpoint. The trainers call these.

Chosen where the paper is silent:
 1. Data order and sampling are seeded per epoch/step, so v, the Adam state and the step are all an
    exact resume needs, on any number of ranks.
 2. A checkpoint is refused by a run whose adapter plan differs (rank, u, tying, P's seed, SVD,
    groups): the same v means nothing under another parameterisation.
"""
import argparse
import glob
import json
import os
import sys
import textwrap

import torch

import task
import tinylora
from harness import scale
from harness.models import check_paths

PAPER_MODEL = "Qwen/Qwen2.5-7B-Instruct"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_SMOL = os.path.join(ROOT, "..", "shared", "models", "smollm2-135m-instruct",
                           "SmolLM2-135M-Instruct.Q4_1.gguf")
# cpu-demo: the CPU search's choice (docs/results.md, "The CPU demo"): 1 shot, 13 parameters, 3e-2
# It keeps the optimisation it was chosen with (before the fork's clip, decay, data order, dual clip
# and P became the defaults): those would need its search re-run.
PRESETS = {
    "cpu-demo": dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", data="arith", shots=1,
                     batch_prompts=4, group_size=8, max_new_tokens=32, max_prompt=512, steps=16,
                     lr=3e-2, micro_batch=32, mini_batches=1, warmup=0.0, val=100, eval_n=200,
                     dtype="float32", reward="strict", out="runs/cpu-demo", grad_clip=1.0,
                     weight_decay=0.0, shuffle=True, dual_clip=0.0, projections="independent"),
}
# cpu-sweep: what docs/results.md's RL-vs-SFT sweep ran (2 shots, 12 steps, micro-batches of 8)
PRESETS["cpu-sweep"] = dict(PRESETS["cpu-demo"], shots=2, steps=12, lr=1e-2, micro_batch=8,
                            out="runs/cpu-sweep")


# ---- The config ----------------------------------------------------------------------------
def add_flags(ap):
    """The trainers' flags for this run: its folder, a preset, --resume, the held-out check."""
    g = ap.add_argument_group("this run")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS))
    g.add_argument("--out", default="runs/gsm8k")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    g.add_argument("--eval-n", type=int, default=0,
                   help="held-out problems scored greedily before and after (0 = off)")
    g.add_argument("--sample-every", type=int, default=5, help="print a sample every k steps")


def new_parser(description):
    """A parser whose usage line names the command as typed (`python -m harness.sft` for a program
    in harness/), with every default in --help."""
    where, name = os.path.split(os.path.splitext(os.path.abspath(sys.argv[0]))[0])
    prog = f"python -m harness.{name}" if os.path.basename(where) == "harness" else None
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def parse(ap, argv=None):
    """A trainer's flags over the saved config (--resume) or a preset's values; then checked."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.resume:
        cfg_path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"--resume {args.resume}: no config.json there")
        saved = json.load(open(cfg_path))
        ap.set_defaults(**{k: v for k, v in saved.items() if k != "resolved"})  # re-resolved here
    elif args.preset:
        smol = dict(model=SHARED_SMOL) if os.path.isfile(SHARED_SMOL) else {}
        ap.set_defaults(**dict(PRESETS[args.preset], **smol))
    args = ap.parse_args(argv)  # explicit flags still win
    args.out = args.resume or args.out
    check_trainer_args(args)
    return args


def check_trainer_args(args):
    if args.u is None and args.n_tie is None and args.params <= 0:
        raise ValueError(f"--params must be positive, got {args.params}")
    if (args.u is None) != (args.n_tie is None):
        raise ValueError("--u and --n-tie go together")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; checked before anything starts
    if args.batch_prompts % (args.mini_batches * world):
        raise ValueError(f"--batch-prompts {args.batch_prompts} does not split into --mini-batches "
                         f"{args.mini_batches} × {world} ranks of whole groups")
    if args.tensor_parallel < 1 or world % args.tensor_parallel:
        raise ValueError(f"--tensor-parallel {args.tensor_parallel} must divide the {world} ranks")
    for k in ("batch_prompts", "group_size", "max_new_tokens", "micro_batch", "mini_batches",
              "epochs"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 for sampling, got {args.temperature}")
    check_paths(args.model, args.data)
    check_gpu_recipe(args)


def check_gpu_recipe(args):
    """The paper's 7B model with no GPU would load in fp32 on the CPU: refused unless insisted."""
    if args.device == "auto" and args.model == PAPER_MODEL and not torch.cuda.is_available():
        raise ValueError("no GPU here: the default --model, Qwen2.5-7B, would load in fp32 on the "
                         "CPU; give a smaller --model (trainers: --preset cpu-demo), or pass "
                         "--device cpu to insist")


def plan_kwargs(args):
    """The tying plan from the adapter flags: --params, or --u with --n-tie."""
    if args.u is None and args.n_tie is None:
        return dict(params=args.params)
    return dict(u=args.u, n_tie=args.n_tie)


def adapter_kwargs(args):
    """apply_tinylora's keyword arguments from the adapter flags."""
    return dict(plan_kwargs(args), r=args.r, tie=args.tie, targets=args.targets.split(","),
                seed=args.proj_seed, svd=args.svd, lora_xs=args.lora_xs,
                projections=args.projections, v_dtype=getattr(torch, args.v_dtype))


def summary(config):
    """Every resolved value as wrapped 'name=value' words, for the console (the run's config.json
    keeps the same dict as JSON)."""
    flat = {k: v for k, v in config.items() if k != "resolved"} | config.get("resolved", {})
    words = [f"{k}={v}".replace(" ", "") for k, v in flat.items()]
    return textwrap.fill(" ".join(["config:"] + words), 100, subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)


def print_config(args, rt):
    if rt.rank == 0:
        print(summary(dict(vars(args), resolved=resolved(rt))))


def resolved(rt):
    return dict(device=rt.device, dtype=str(rt.dtype), backend=rt.backend, world_size=rt.world,
                grad_checkpointing=rt.grad_checkpointing)


def run_cli(main):
    """Run a program's main(): a ValueError (a bad input) is one line on stderr and exit code 2."""
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---- The run folder ------------------------------------------------------------------------
def start(args, rt, bank, rows, prompts):
    """After every check has passed: the plan on the console, the out folder, config.json (every
    resolved value; --resume reads it). rows: the training problems; prompts: those that fit."""
    if len(prompts) < args.batch_prompts:
        raise ValueError(f"only {len(prompts)} training prompts fit in --max-prompt "
                         f"{args.max_prompt}, fewer than --batch-prompts {args.batch_prompts}")
    bank.config["base_model"] = args.model
    os.makedirs(args.out, exist_ok=True)
    if rt.rank == 0:
        from harness.export import bank_plan
        print(bank_plan(bank))
        ranks = f"; {rt.world} ranks" if rt.world > 1 else ""
        print(f"data: {len(prompts)} training prompts ({len(rows) - len(prompts)} over "
              f"{args.max_prompt} tokens dropped){ranks}")
    if not args.resume and rt.rank == 0:
        saved = {k: v for k, v in vars(args).items() if k not in ("resume", "preset")}
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(dict(saved, resolved=resolved(rt)), f, indent=1, default=str)


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


def save_step(args, row, bank, opt, opt_steps):
    """After a step: its log row, then (rank 0) the checkpoint and the adapter, written whole."""
    append_jsonl(os.path.join(args.out, "log.jsonl"), row)
    if scale.rank_world()[0] == 0:
        save_checkpoint(os.path.join(args.out, "checkpoint.safetensors"), bank, opt, row["step"],
                        opt_steps, vars(args))
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
    tmp = f"{path}.tmp{os.getpid()}"  # renamed into place: never half a file
    save_file(tensors, tmp, metadata={"trainer": json.dumps(meta, default=str)})
    os.replace(tmp, path)


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


def append_jsonl(path, row):
    """Append one row; under torchrun only rank 0 writes."""
    if scale.rank_world()[0] == 0:
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


# ---- The log: a step's row, the held-out check, the end of a run ------------------------------
def step_metrics(r, G, comps, problems, old_lp, stats, tis_cap):
    """The log row's statistics. r (N,) rewards in groups of G; old_lp (N, C): the trainer's π_old,
    compared with each completion's sampler log-probs."""
    n = torch.tensor([len(c["ids"]) for c in comps])
    mask = scale.completion_mask(n, old_lp.shape[1]).bool()  # (N, C)
    sampler_lp = sampler_logprobs(comps, old_lp.shape[1])
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


def sampler_logprobs(comps, C=None):
    """The sampler's log-probs as a right-padded tensor (N, C), C: the longest completion."""
    out = torch.zeros(len(comps), C or max(len(c["ids"]) for c in comps))
    for i, c in enumerate(comps):
        out[i, :len(c["logprobs"])] = torch.tensor(c["logprobs"])
    return out


def time_left(out, step, start, total, per_epoch):
    """On the console, whether the run fits a booking: after this process's first step, the rest
    at that step's pace; after each epoch, the rest at the epoch's mean pace (t_step, log.jsonl)."""
    first = step == start + 1
    if step >= total or not (first or step % per_epoch == 0):
        return
    rows = [r for r in read_jsonl(os.path.join(out, "log.jsonl")) if r["kind"] == "train"]
    paces = [r["t_step"] for r in rows[-(1 if first else per_epoch):]]
    pace = sum(paces) / len(paces)
    left = (total - step) * pace
    what = (f"step {step} took {pace:.1f} s (a first step can be slower)" if first
            else f"epoch {step // per_epoch} done at {pace:.1f} s a step")
    from tqdm import tqdm
    tqdm.write(f"{what}: {total - step} steps left ≈ {int(left // 3600)} h "
               f"{int(left % 3600 // 60):02d} min")


def sample_text(step, reward, problem, comp):
    head = f"--- step {step} sample (reward {reward:.0f}, gold {problem['gold']:g}):"
    return f"{head}\n{comp['text']}\n---"


def heldout(generator, tok, args, step):
    """The trainers' check: greedy accuracies on the first --eval-n held-out problems, as a log row
    (with every problem's verdict and reply), appended to the run's log."""
    import eval as evaluation
    rows, shots = task.load_task(args.data, "test", args.shots)
    items = task.prompt_ids(tok, rows[:args.eval_n], shots, args.max_prompt)
    res, m = evaluation.run_eval(generator, items, args.max_new_tokens, args.seed)
    row = dict(kind="eval", step=step, n=m["n"], seconds=m["seconds"], paper=m["paper"]["acc"],
               strict=m["strict"]["acc"], flexible=m["flexible"]["acc"], has_hash=m["has_hash"],
               finished=1 - m["truncated"], right=[int(r["strict"]) for r in res],
               questions=[r["question"] for r in res], replies=[r["reply"] for r in res])
    if scale.rank_world()[0] == 0:
        print(f"eval @ step {step}: paper {row['paper']:.1%}  strict {row['strict']:.1%}  "
              f"flexible {row['flexible']:.1%}  '####' present {row['has_hash']:.1%}  "
              f"({row['seconds']:.0f}s)")
    append_jsonl(os.path.join(args.out, "log.jsonl"), row)
    return row


def before_after(first, last):
    """The console's account of a run from its first and last held-out rows (heldout's): strict
    before -> after, problems gained and lost with McNemar's p, and one problem the update turned
    from wrong to right, its reply before and after."""
    from eval import mcnemar_exact
    gained = [i for i, (a, b) in enumerate(zip(first["right"], last["right"])) if b and not a]
    lost = sum(a and not b for a, b in zip(first["right"], last["right"]))
    text = (f"held-out strict {first['strict']:.1%} -> {last['strict']:.1%}: {len(gained)} "
            f"gained, {lost} lost, McNemar p = {mcnemar_exact(len(gained), lost):.2g}")
    for i in gained[:1]:
        text += (f"\n  e.g. {last['questions'][i]}\n    before: {first['replies'][i]!r}"
                 f"\n    after:  {last['replies'][i]!r}")
    return text


def finish(args, bank, generator=None, tok=None, steps=0):
    """The end of a run: the held-out check (--eval-n), the adapter (also after resuming a finished
    run), the reward plot, the before/after account and where everything is."""
    log, adapter = (os.path.join(args.out, f) for f in ("log.jsonl", "adapter.safetensors"))
    if args.eval_n:
        generator.push(bank)
        heldout(generator, tok, args, steps)
    if scale.rank_world()[0] == 0:
        tinylora.save_adapter(bank, adapter, base_model=args.model)
        plot = plot_rewards(log, os.path.join(args.out, "reward.png"))
        evals = [r for r in read_jsonl(log) if r["kind"] == "eval"] if os.path.isfile(log) else []
        if len(evals) > 1:
            print(before_after(evals[0], evals[-1]))
        print(f"done: adapter {adapter} ({bank.v.numel()} parameters), log {log}"
              + (f", reward plot {plot}" if plot else ""))
    scale.barrier()
    return bank


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
    rows = read_jsonl(log_path) if os.path.isfile(log_path) else []
    tr = [r for r in rows if r["kind"] == "train" and "reward" in r]
    ev = [r for r in rows if r["kind"] == "eval"]
    if not tr:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    return out


def eval_report(report, args, n, metrics):
    """eval.py's table (accuracy and 95% interval per metric), its paired comparison, and its JSON
    report: --out, or eval-DATA.json beside the adapter (eval.json without one)."""
    print(f"\n{args.model} on {args.data} [{args.split}], {n} problems, greedy, "
          f"{args.max_new_tokens} new tokens")
    print(f"{'':11s} " + " ".join(f"{k:>24s}" for k in metrics)
          + f" {'####':>6s} {'trunc':>6s} {'tokens':>7s} {'time':>6s}")
    for k, m in report["models"].items():
        cells = [f"{m[x]['acc']:6.1%} [{m[x]['ci95'][0]:5.1%}, {m[x]['ci95'][1]:5.1%}]"
                 for x in metrics]
        print(f"{k:11s} " + " ".join(f"{c:>24s}" for c in cells) + f" {m['has_hash']:6.1%} "
              f"{m['truncated']:6.1%} {m['mean_tokens']:7.1f} {m['seconds']:5.0f}s")
    for pair, by_metric in report["compare"].items():  # "base vs adapter": the second's gains
        first, second = pair.split(" vs ")
        for k, c in by_metric.items():
            verdict = "significant" if c["significant"] else "not significant"
            print(f"{k}: {second} − {first} = {c['diff']:+.1%} ({c['adapter_only']} gained, "
                  f"{c['base_only']} lost), McNemar p = {c['p_value']:.2g} -> {verdict} at 5%")
        agree = [report["problems"][first][i] == report["problems"][second][i] for i in range(n)]
        if first != "base" and all(agree):
            print(f"{first} and {second} agree on every problem's reply")
    name = f"eval-{os.path.basename(args.data)}.json"
    out = args.out or (os.path.join(os.path.dirname(args.adapter), name) if args.adapter
                       else "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"report: {out}")
