"""
eval.py's report: a table of accuracies with 95% intervals per metric, the paired comparisons, and
the JSON file with every problem's verdict and reply.
"""
import os

from harness.files import write_json


def print_report(report, args, n, metrics):
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
    write_json(out, report)
    print(f"report: {out}")
