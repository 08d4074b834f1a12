"""
RL versus SFT across parameter budgets: the paper's Figures 1-2 in miniature, in one command.

    python -m harness.sweep --preset cpu-sweep --out runs/cpu-sweep   # SmolLM2, arithmetic, CPU
    python -m harness.sweep --model Qwen/Qwen2.5-7B-Instruct --data openai/gsm8k \
        --budgets 1,13,120,xs2 --val 500 --eval-limit 0 --out runs/sweep-gsm8k   # on a GPU

Budgets: N = exactly N trained scalars (train_grpo.py --params N); xsR = LoRA-XS of rank R, untied
(R² per module). For each budget and method (rl = train_grpo.py, sft = harness/sft.py) each --lrs
value is trained with seed 0 and scored greedily on the validation split (the last --val training
problems); the best one is scored on the held-out split and trained again with the other seeds
(--seed: data order and sampling; P and the SVD sketch stay those of --proj-seed). Flags this
script does not know go to both trainers (e.g. --steps 10). One model and one generator serve every
run, in-process. Writes OUT/results.jsonl (a row per evaluation, with every problem's verdict),
OUT/table.md, OUT/accuracy.png. Killed? The same command keeps the evaluations on file and resumes
a run in progress from its checkpoint.

Chosen where the paper is silent:
 1. The lr is the best validation strict accuracy (ties: the smaller lr); the held-out split only
    ever sees the chosen lr. RL and SFT get the same grid and the same problems in the same order.
 2. Base = the adapted model at v = 0 (bit-identical to the untouched model, tested).
 3. Intervals: Wilson 95% per point; p: exact McNemar against the base on the same held-out
    problems (seed 0; the other seeds' points are drawn as dots and listed).
"""
import json
import os

import eval as evaluation
import rollout
import task
import tinylora
import train_grpo
from harness import config, models, rl_vs_sft, sft
from harness.files import append_jsonl, write_json

TRAINERS = {"rl": train_grpo.main, "sft": sft.main}


def get_args(argv=None):
    ap = config.new_parser(__doc__.split("\n")[1])
    ap.add_argument("--budgets", default="1,13,210,xs2,xs8",
                    help="N (exact scalars) or xsR (LoRA-XS rank R)")
    ap.add_argument("--methods", default="rl,sft")
    ap.add_argument("--lrs", default="1e-2,3e-2,1e-1",
                    help="the learning-rate grid, per budget and method")
    ap.add_argument("--seeds", type=int, default=2,
                    help="seeds for the chosen lr (seed 0 is the grid's)")
    ap.add_argument("--extra-seeds-for", default="13",
                    help="budgets that get the extra seeds ('all' for every)")
    ap.add_argument("--val", type=int, default=100,
                    help="validation problems, carved from the end of train")
    ap.add_argument("--eval-limit", type=int, default=200,
                    help="held-out problems scored (0 = all)")
    ap.add_argument("--test-all", action="store_true",
                    help="score every grid point on the held-out split too (a search's table)")
    ap.add_argument("--out", default="runs/sweep")
    args, rest = ap.parse_known_args(argv)
    args.trainer = rest + ["--val", str(args.val), "--eval-n", "0", "--sample-every", "0"]
    args.budgets, args.methods = args.budgets.split(","), args.methods.split(",")
    args.lrs = [float(x) for x in args.lrs.split(",")]
    for b in args.budgets:
        budget_flags(b)
    if set(args.methods) - set(TRAINERS) or args.seeds < 1 or args.val < 1:
        raise ValueError(f"--methods from {sorted(TRAINERS)}, --seeds and --val >= 1; got "
                         f"{args.methods}, {args.seeds}, {args.val}")
    return args


def budget_flags(b):
    """'13' -> --params 13; 'xs8' -> LoRA-XS rank 8, one group per module."""
    if b.isdigit() and int(b) > 0:
        return ["--params", b]
    if b.startswith("xs") and b[2:].isdigit() and int(b[2:]) > 0:
        r = int(b[2:])
        return ["--lora-xs", "--r", str(r), "--u", str(r * r), "--n-tie", "1"]
    raise ValueError(f"unknown budget {b!r}: use N (e.g. 13) or xsR (e.g. xs2)")


def load_shared(args):
    """One model and generator for every run: (trainer args of the first run, (model, tok,
    generator))."""
    t = config.trainer_args(args.trainer + ["--out", args.out])
    rt = models.runtime(t.device, t.dtype, t.backend, t.dist_timeout)
    model, tok = models.load_model(t.model, rt.dtype, rt.device)
    generator = rollout.make_generator(rt.backend, model, tok, None, t.model, args.out,
                                       t.max_prompt + t.max_new_tokens, t.seed,
                                       gpu_memory_utilization=t.gpu_memory_utilization)
    return t, (model, tok, generator)


def score(generator, tok, bank, t, split, limit):
    """Greedy eval of the current v on `split` with eval.py's protocol: (per-problem verdicts and
    replies, summary)."""
    rows, shots = task.load_task(t.data, split, t.shots, t.val)
    items = task.prompt_ids(tok, rows[:limit] if limit else rows, shots, t.max_prompt, t.prompt)
    generator.push(bank)
    res, summary = evaluation.run_eval(generator, items, t.max_new_tokens, t.seed, label=split)
    return [dict({k: r[k] for k in evaluation.METRICS}, reply=r["reply"]) for r in res], summary


def train_and_score(args, shared, done, method, budget, lr, seed, splits):
    """Train one point (or resume it) and score it on `splits`, unless results.jsonl already has
    them."""
    name = f"{method}-{budget}-lr{lr:g}-s{seed}"
    todo = [s for s in splits if (name, s) not in done]
    if not todo:
        return
    run_dir = os.path.join(args.out, name)
    ckpt = os.path.join(run_dir, "checkpoint.safetensors")
    argv = (["--resume", run_dir] if os.path.isfile(ckpt) else
            args.trainer + budget_flags(budget) + ["--lr", str(lr), "--seed", str(seed), "--out",
                                                   run_dir])
    t = config.trainer_args(argv)
    bank = TRAINERS[method](argv, shared)
    try:
        for split in todo:
            record(args, done, shared, bank, t,
                   dict(name=name, method=method, budget=budget, lr=lr, seed=seed), split)
    finally:
        tinylora.remove_tinylora(shared[0])


def record(args, done, shared, bank, t, key, split):
    verdicts, summary = score(shared[2], shared[1], bank, t, split,
                              args.eval_limit if split == "test" else 0)
    row = dict(key, split=split, params=bank.v.numel(), **summary, verdicts=verdicts)
    append_jsonl(os.path.join(args.out, "results.jsonl"), row)
    done[(key["name"], split)] = row
    strict, flexible = summary["strict"]["acc"], summary["flexible"]["acc"]
    print(f"{key['name']} [{split}]: strict {strict:.1%}  flexible {flexible:.1%}")


def main(argv=None):
    args = get_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t, shared = load_shared(args)
    done = rl_vs_sft.results(args.out)
    write_json(os.path.join(args.out, "sweep.json"), dict(vars(args), first_run=vars(t)))
    from tqdm import tqdm
    # ---- base: v = 0 on both splits (any budget's adapter at v = 0 is the untouched model)
    if ("base", "test") not in done:
        bank = tinylora.apply_tinylora(shared[0], params=1, targets=t.targets.split(","))
        try:
            for split in ("val", "test"):
                record(args, done, shared, bank, t,
                       dict(name="base", method="base", budget="0", lr=0.0, seed=0), split)
        finally:
            tinylora.remove_tinylora(shared[0])
    # ---- the grid (seed 0, validation), then the chosen lr on the held-out split and with more
    # seeds
    points = [(m, b) for b in args.budgets for m in args.methods]
    for m, b in tqdm(points, desc="sweep", position=0):
        for lr in args.lrs:
            train_and_score(args, shared, done, m, b, lr, 0, ["val"] + ["test"] * args.test_all)
        lr = rl_vs_sft.chosen(done, b, m, args.lrs)[0]
        train_and_score(args, shared, done, m, b, lr, 0, ["val", "test"])
        extra = args.extra_seeds_for == "all" or b in args.extra_seeds_for.split(",")
        for seed in range(1, args.seeds) if extra else []:
            train_and_score(args, shared, done, m, b, lr, seed, ["test"])
    report(args, done)


def report(args, done):
    """table.md and accuracy.png of this sweep (harness/rl_vs_sft.py)."""
    cfg = json.load(open(os.path.join(args.out, "sweep.json")))
    text = rl_vs_sft.table(done, cfg)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    print(text)
    rl_vs_sft.plot([(done, cfg)], [os.path.basename(args.out)],
                   os.path.join(args.out, "accuracy.png"))


if __name__ == "__main__":
    config.run_cli(main)
