"""
eval.py's report: a table of accuracies with 95% intervals per metric (for --suite math, Table 2's
layout: a column per benchmark and their average), the paired comparisons, and the JSON file with
every problem's verdict and reply.
"""
import json
import os

import task
from harness.files import write_json

PROTOCOL = dict(decoding="greedy",
                prompt="chat template: K solved train problems as earlier turns, then question + "
                + json.dumps(task.SUFFIX),
                paper="verl: last '#### N' in the last 300 chars == gold as a string",
                strict="number after the last '####' == gold, reply ended with EOS",
                flexible="last number in the reply == gold")
MATH_PROTOCOL = dict(prompt="qwen-boxed: " + json.dumps(task.PROMPTS["qwen-boxed"]),
                     decoding="greedy; --samples k: temperature 1.0, top-p 0.95, avg@k (the fork)",
                     **{"math-verify": "Qwen2.5-Math's extraction, Math-Verify equivalence",
                        "math": "verl: the last \\boxed{}, Hendrycks' normalisation, string =="})


def cell(m):
    """'acc [lo, hi]' of one summary metric."""
    return f"{m['acc']:6.1%} [{m['ci95'][0]:5.1%}, {m['ci95'][1]:5.1%}]"


def print_task(found, args, metrics):
    """The task's table: per model, each metric with its interval, '####', truncation, length."""
    n = found["models"][next(iter(found["models"]))]["n"]
    print(f"\n{args.model} on {args.data} [{args.split}], {n} problems, greedy, "
          f"{args.max_new_tokens} new tokens")
    print(f"{'':11s} " + " ".join(f"{k:>24s}" for k in metrics)
          + f" {'####':>6s} {'trunc':>6s} {'tokens':>7s} {'time':>6s}")
    for k, m in found["models"].items():
        cells = [cell(m[x]) for x in metrics]
        print(f"{k:11s} " + " ".join(f"{c:>24s}" for c in cells)
              + f" {m.get('has_hash', float('nan')):6.1%} "
              f"{m['truncated']:6.1%} {m['mean_tokens']:7.1f} {m['seconds']:5.0f}s")
    print_pairs(found)


def print_pairs(found, prefix=""):
    """Each paired comparison's line per metric: the second's gains and losses, McNemar's p."""
    for pair, by_metric in found["compare"].items():  # "base vs adapter": the second's gains
        first, second = pair.split(" vs ")
        for k, c in by_metric.items():
            verdict = "significant" if c["significant"] else "not significant"
            print(f"{prefix}{k}: {second} − {first} = {c['diff']:+.1%} ({c['adapter_only']} "
                  f"gained, {c['base_only']} lost), McNemar p = {c['p_value']:.2g} -> {verdict} "
                  "at 5%")
        replies = [[r["reply"] for r in found["problems"][x]] for x in (first, second)]
        if first != "base" and replies[0] == replies[1]:
            print(f"{prefix}{first} and {second} agree on every problem's reply")


def print_suite(benchmarks, args, metrics):
    """Table 2's layout: a row per model, a column per benchmark (accuracy and 95% interval), and
    the unweighted average over benchmarks, for each metric; then each benchmark's comparisons."""
    names = list(benchmarks)
    decoding = "greedy" if args.samples == 1 else f"avg@{args.samples}, T 1.0, top-p 0.95"
    print(f"\n{args.model}, {decoding}, {args.max_new_tokens} new tokens; problems: "
          + ", ".join(f"{b} {benchmarks[b]['models'][next(iter(benchmarks[b]['models']))]['n']}"
                      for b in names))
    for metric in metrics:
        print(f"{metric:11s} " + " ".join(f"{b:>24s}" for b in names) + f" {'average':>8s}")
        for label in benchmarks[names[0]]["models"]:
            accs = [benchmarks[b]["models"][label][metric] for b in names]
            print(f"{label:11s} " + " ".join(f"{cell(a):>24s}" for a in accs)
                  + f" {sum(a['acc'] for a in accs) / len(accs):8.1%}")
    for b in names:
        print_pairs(benchmarks[b], prefix=f"{b} ")


def print_report(results, args, metrics):
    """The tables, the comparisons and the JSON report: --out, or eval-DATA.json (eval-math.json
    for the suite) beside the adapter (eval.json without one)."""
    if "benchmarks" in results:
        print_suite(results["benchmarks"], args, metrics)
    else:
        print_task(results, args, metrics)
    name = f"eval-{args.suite or os.path.basename(args.data)}.json"
    out = args.out or (os.path.join(os.path.dirname(args.adapter), name) if args.adapter
                       else "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, results)
    print(f"report: {out}")
