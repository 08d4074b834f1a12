"""
GSM8K evaluation: one model, prompt, greedy decoding and extractor set, with and without an adapter.

    python eval.py --adapter runs/gsm8k/adapter.safetensors --compare        # Qwen2.5-7B-Instruct
    python eval.py --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data arith --shots 1 --adapter runs/cpu-demo/adapter.safetensors --compare \\
        --max-new-tokens 32           # the CPU demo's prompt; --data arith-transfer: transfer

Protocol (printed with every report): greedy, the chat template and prompt of task.py (the module
train_grpo.py uses), the full test split unless --limit. Three scores per reply: paper = verl's
GSM8K rule, the paper's metric (the last '#### N' in the last 300 characters string-equals the gold;
cut-off replies count); strict = ours (the number after the last '####' equals the gold and the
reply ended on its own); flexible = the last number in the reply.

Chosen where the paper is silent:
 1. 95% intervals are Wilson score intervals (sound near 0% and 100%, unlike the normal one).
 2. --compare runs base and adapter on the same problems; the base is the same adapted model with
    v = 0, bit-identical to the untouched model (tested). The difference is judged with an exact
    McNemar test on the discordant pairs: the two runs are paired, not independent samples.
 3. With vLLM the adapter reaches the engine exactly: as the rank-r LoRA on a bf16 generator (a bf16
    merge rounds most of a small ΔW away), as merged fp32 weights W0 + ΔW on an fp32 one.
"""
import json
import math
import os
import time
import types

import torch

import rollout
import task
import tinylora
from harness import dist, export, flags
from harness.models import check_paths, load_model, resolve_runtime

METRICS = ("paper", "strict", "flexible")


# ---- Metrics: pure functions -------------------------------------------------------------------
def wilson(k, n, z=1.959964):
    """95% Wilson score interval for k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, mid - half), min(1.0, mid + half))


def mcnemar_exact(b, c):
    """Two-sided exact McNemar p-value: b = right only in A, c = right only in B (binomial, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def summarize(results):
    """Accuracies with intervals, lengths, truncation and unparseable counts over score dicts."""
    n = len(results)
    out = dict(n=n)
    for k in METRICS:
        hits = sum(r[k] for r in results)
        lo, hi = wilson(hits, n)
        out[k] = dict(acc=hits / n, correct=hits, ci95=[lo, hi])
    out["has_hash"] = sum(r["has_hash"] for r in results) / n
    out["mean_tokens"] = sum(r["n_tokens"] for r in results) / n
    out["truncated"] = sum(not r["finished"] for r in results) / n
    out["unparseable"] = sum(r["unparseable"] for r in results)
    return out


def compare(base, adapted, key="strict"):
    """Paired comparison of two result lists on the same problems."""
    b = sum(x[key] and not y[key] for x, y in zip(base, adapted))  # right only without the adapter
    c = sum(y[key] and not x[key] for x, y in zip(base, adapted))  # right only with it
    p = mcnemar_exact(b, c)
    return dict(metric=key, base_only=b, adapter_only=c, diff=(c - b) / len(base), p_value=p,
                significant=p < 0.05)


# ---- Config ------------------------------------------------------------------------------------
def get_args(argv=None):
    ap = flags.new_parser("GSM8K evaluation of a model with and without a TinyLoRA adapter")
    for add in (flags.add_model, flags.add_data, flags.add_generator, flags.add_run):
        add(ap)
    g = ap.add_argument_group("evaluation")
    g.add_argument("--adapter", default=None, help="a TinyLoRA adapter (.safetensors)")
    g.add_argument("--compare", action="store_true", help="evaluate base and adapter in one run")
    g.add_argument("--split", default="test", help="test, or val (the last --val train problems)")
    g.add_argument("--limit", type=int, default=None, help="first N problems only")
    g.add_argument("--batch-size", type=int, default=64,
                   help="prompts per HF generate call (vLLM takes them all at once)")
    g.add_argument("--out", default=None, help="JSON report (default: next to the adapter)")
    g.add_argument("--work-dir", default=".cache", help="where vLLM's copy of a .gguf model goes")
    args = ap.parse_args(argv)
    if args.compare and not args.adapter:
        raise ValueError("--compare needs --adapter")
    if args.adapter and not os.path.isfile(args.adapter):
        raise ValueError(f"adapter file not found: {args.adapter}")
    check_paths(args.model, args.data)
    flags.check_gpu_recipe(args)
    if args.limit is not None and args.limit < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError("--limit, --max-new-tokens and --batch-size must be >= 1")
    return args


# ---- Scoring -----------------------------------------------------------------------------------
def run(generator, items, args, label):
    """Greedy replies to every item and their verdicts: (per-problem results, summary). Under
    torchrun each rank answers a contiguous 1/world of the items; every rank gets all results."""
    from tqdm import tqdm
    rank, world = dist.rank_world()
    mine = items[rank * len(items) // world:(rank + 1) * len(items) // world]
    t0, comps = time.time(), []
    size = args.batch_size if generator.llm is None else max(1, len(mine))  # vLLM batches itself
    for s in tqdm(range(0, len(mine), size), desc=label, disable=rank > 0 or size >= len(mine)):
        prompts = [p for _, p in mine[s:s + size]]
        comps += generator.generate(prompts, 1, args.max_new_tokens, 0.0, args.seed)
    res = dist.gather([dict(question=r["question"], gold=r["gold"], reply=c["text"],
                            **task.score(c["text"], r, c["finished"], len(c["ids"])))
                       for (r, _), c in zip(mine, comps)])
    return res, dict(summarize(res), seconds=time.time() - t0)


def heldout(generator, tok, args, step):
    """The trainers' check: greedy accuracies on the first --eval-n held-out problems, a log row."""
    rows, shots = task.load_task(args.data, "test", args.shots)
    items = task.prompt_ids(tok, rows[:args.eval_n], shots, args.max_prompt)
    how = types.SimpleNamespace(batch_size=64, max_new_tokens=args.max_new_tokens, seed=args.seed)
    res, m = run(generator, items, how, "eval")
    row = dict(kind="eval", step=step, n=m["n"], seconds=m["seconds"], paper=m["paper"]["acc"],
               strict=m["strict"]["acc"], flexible=m["flexible"]["acc"], has_hash=m["has_hash"],
               finished=1 - m["truncated"], right=[int(r["strict"]) for r in res],
               questions=[r["question"] for r in res], replies=[r["reply"] for r in res])
    if dist.rank_world()[0] == 0:
        print(f"eval @ step {step}: paper {row['paper']:.1%}  strict {row['strict']:.1%}  "
              f"flexible {row['flexible']:.1%}  '####' present {row['has_hash']:.1%}  "
              f"({row['seconds']:.0f}s)")
    return row


def before_after(first, last):
    """The console's account of a run from its first and last held-out rows (heldout's): strict
    before -> after, problems gained and lost with McNemar's p, and one problem the update turned
    from wrong to right, its reply before and after."""
    gained = [i for i, (a, b) in enumerate(zip(first["right"], last["right"])) if b and not a]
    lost = sum(a and not b for a, b in zip(first["right"], last["right"]))
    text = (f"held-out strict {first['strict']:.1%} -> {last['strict']:.1%}: {len(gained)} "
            f"gained, {lost} lost, McNemar p = {mcnemar_exact(len(gained), lost):.2g}")
    for i in gained[:1]:
        text += (f"\n  e.g. {last['questions'][i]}\n    before: {first['replies'][i]!r}"
                 f"\n    after:  {last['replies'][i]!r}")
    return text


def print_report(report, args, n):
    print(f"\n{args.model} on {args.data} [{args.split}], {n} problems, greedy, "
          f"{args.max_new_tokens} new tokens")
    print(f"{'':8s} " + " ".join(f"{k:>24s}" for k in METRICS)
          + f" {'####':>6s} {'trunc':>6s} {'tokens':>7s} {'time':>6s}")

    def cell(x):
        return f"{x['acc']:6.1%} [{x['ci95'][0]:5.1%}, {x['ci95'][1]:5.1%}]"

    for k, m in report["models"].items():
        print(f"{k:8s} " + " ".join(f"{cell(m[x]):>24s}" for x in METRICS)
              + f" {m['has_hash']:6.1%} {m['truncated']:6.1%} {m['mean_tokens']:7.1f} "
              f"{m['seconds']:5.0f}s")
    for k, c in report.get("compare", {}).items():
        verdict = "significant" if c["significant"] else "not significant"
        print(f"{k}: adapter − base = {c['diff']:+.1%} ({c['adapter_only']} gained, "
              f"{c['base_only']} lost), McNemar p = {c['p_value']:.2g} -> {verdict} at 5%")


def main(argv=None):
    args = get_args(argv)
    dev, dtype, backend = resolve_runtime(args.device, args.dtype, args.backend)
    rank, world, dev = dist.init_distributed(dev, args.dist_timeout)  # each rank scores its share
    rows, shots = task.load_task(args.data, args.split, args.shots, args.val)
    rows = rows[:args.limit] if args.limit else rows
    protocol = protocol_of(args, shots)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"protocol: {json.dumps(protocol)}\nbackend {backend}, device {dev}, dtype {dtype}"
        + (f", {world} ranks" if world > 1 else ""))

    # ---- model, adapter (v = 0 is the base, bit-identical), prompts, generator
    model, tok = load_model(args.model, dtype=dtype, device=dev)
    items = task.prompt_ids(tok, rows, shots, args.max_prompt)
    if len(items) < len(rows):
        say(f"note: {len(rows) - len(items)} prompts over {args.max_prompt} tokens skipped")
    bank = tinylora.load_adapter(model, args.adapter) if args.adapter else None
    if bank is not None:
        trained = bank.v.detach().clone()
        base = bank.config.get("base_model")
        say(export.bank_plan(bank) + f" (from {args.adapter}, trained on {base})")
    work = os.path.join(args.work_dir, os.path.basename(os.path.normpath(args.model)))
    sync = "merged" if dtype == torch.float32 else "lora"  # exact either way
    generator = rollout.make_generator(backend, model, tok, bank, args.model, work, dtype,
                                       args.max_prompt + args.max_new_tokens, args.seed,
                                       args.gpu_memory_utilization, sync)

    # ---- evaluate: base (v = 0) and/or adapter, on the same problems
    report = dict(config=vars(args), protocol=protocol, backend=backend, device=dev,
                  dtype=str(dtype), models={}, problems={})
    labels = ["base"] if not args.adapter or args.compare else []
    labels += ["adapter"] if args.adapter else []
    for label in labels:
        if bank is not None:
            with torch.no_grad():
                bank.v.copy_(trained if label == "adapter" else torch.zeros_like(trained))
            generator.push(bank)
        report["problems"][label], report["models"][label] = run(generator, items, args, label)
    if args.compare:
        base, adapted = report["problems"]["base"], report["problems"]["adapter"]
        report["compare"] = {k: compare(base, adapted, k) for k in METRICS}
    if rank == 0:
        print_report(report, args, len(items))
        write_report(report, args)
    return report


def protocol_of(args, shots):
    return dict(
        decoding="greedy", shots=len(shots), max_new_tokens=args.max_new_tokens,
        prompt="chat template: K solved train problems as earlier turns, then question + "
               + json.dumps(task.SUFFIX),
        paper="verl: last '#### N' in the last 300 chars == gold as a string",
        strict="number after the last '####' == gold, reply ended with EOS",
        flexible="last number in the reply == gold")


def write_report(report, args):
    """The JSON report: --out, or eval-DATA.json beside the adapter (eval.json without one)."""
    name = f"eval-{os.path.basename(args.data)}.json"
    out = args.out or (os.path.join(os.path.dirname(args.adapter), name) if args.adapter
                       else "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"report: {out}")


if __name__ == "__main__":
    flags.run_cli(main)
