"""
GSM8K evaluation: the same model, prompt, greedy decoding and extractor, with and without a TinyLoRA adapter.

    python eval.py --model Qwen/Qwen2.5-7B-Instruct --adapter runs/gsm8k/adapter.safetensors --compare
    python eval.py --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data ../shared/data/gsm8k/test.jsonl --limit 200 --max-new-tokens 256
    python eval.py --model <smollm2> --data arith --adapter runs/cpu-demo/adapter.safetensors --compare --max-new-tokens 40

Protocol (printed with every report): greedy, the chat template and prompt of task.py (the same module
train_grpo.py uses), the full test split unless --limit. Three scores per reply: paper = verl's GSM8K rule, the
paper's metric (the last '#### N' in the last 300 characters string-equals the gold; cut-off replies count);
strict = ours (the number after the last '####' equals the gold and the reply ended on its own); flexible =
the last number in the reply.

Chosen where the paper is silent:
 1. 95% intervals are Wilson score intervals (sound near 0% and 100%, unlike the normal approximation).
 2. --compare runs base and adapter on the same problems; the base is the same adapted model with v = 0,
    which is bit-identical to the untouched model (tested). The difference is judged with an exact
    McNemar test on the discordant pairs, because the two runs are paired, not independent samples.
 3. With vLLM the adapter reaches the engine as the exact rank-r LoRA unless the generator is fp32, where
    W0+ΔW is merged (fp32 math from the pristine W0): a bf16 merge rounds most of a small ΔW away.
"""
import argparse
import json
import math
import os
import time

import torch

import engine
import task
import tinylora

# -----------------------------------------------------------------------------
# Metrics: pure functions


METRICS = ("paper", "strict", "flexible")


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
    """Two-sided exact McNemar p-value: b = right only in A, c = right only in B (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def summarize(results):
    """Accuracies with intervals, lengths, truncation and unparseable counts over a list of score dicts."""
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
    return dict(metric=key, base_only=b, adapter_only=c, diff=(c - b) / len(base), p_value=p, significant=p < 0.05)


# -----------------------------------------------------------------------------


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="GSM8K evaluation of a model with/without a TinyLoRA adapter",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="hub id, local folder or .gguf file")
    ap.add_argument("--adapter", default=None, help="a tinylora.py adapter (.safetensors)")
    ap.add_argument("--compare", action="store_true", help="evaluate base and adapter in one run")
    ap.add_argument("--data", default="openai/gsm8k", help="openai/gsm8k, a .jsonl file, a folder, or 'arith'")
    ap.add_argument("--split", default="test", help="test, or val (the last --val training problems)")
    ap.add_argument("--val", type=int, default=0, help="size of the validation split (as in training)")
    ap.add_argument("--shots", type=int, default=None, help="solved train problems in the prompt (default: arith 2, else 0)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems only")
    ap.add_argument("--backend", default="auto", choices=["auto", "vllm", "hf"])
    ap.add_argument("--max-new-tokens", type=int, default=4096)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--sync", default="auto", choices=["auto", "merged", "lora"],
                    help="how vLLM gets ΔW; auto: the exact LoRA unless the generator is fp32 (a bf16 "
                         "merge rounds most of a small ΔW away)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON report path (default: next to the adapter, or eval.json)")
    ap.add_argument("--work-dir", default=".cache", help="where a .gguf model is exported for vLLM (and a LoRA pushed)")
    ap.add_argument("--dist-timeout", type=float, default=1800, help="under torchrun: seconds a rank waits for the others")
    args = ap.parse_args(argv)
    if args.compare and not args.adapter:
        raise ValueError("--compare needs --adapter")
    if args.adapter and not os.path.isfile(args.adapter):
        raise ValueError(f"adapter file not found: {args.adapter}")
    engine.check_paths(args.model, args.data)
    if args.limit is not None and args.limit < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError("--limit, --max-new-tokens and --batch-size must be >= 1")
    return args


def run(gen, items, args, label):
    """Greedy replies to every item and their verdicts: (per-problem results, summary). Under torchrun each
    rank answers a contiguous 1/world of the items and every rank gets all results, in the items' order."""
    from tqdm import tqdm
    rank, world = engine.rank_world()
    mine = items[rank * len(items) // world:(rank + 1) * len(items) // world]
    t0, comps = time.time(), []
    for s in tqdm(range(0, len(mine), args.batch_size), desc=label, disable=rank > 0):
        comps += gen.generate([p for _, p in mine[s:s + args.batch_size]], 1, args.max_new_tokens, 0.0, args.seed)
    res = engine.gather([dict(question=r["question"], gold=r["gold"], reply=c["text"],
                              **task.score(c["text"], r, c["finished"], len(c["ids"])))
                         for (r, _), c in zip(mine, comps)])
    return res, dict(summarize(res), seconds=time.time() - t0)


def heldout(gen, tok, args, step):
    """The trainers' check: greedy strict/flexible accuracy on the first --eval-n held-out problems, a log row."""
    rows, shots = task.load_task(args.data, "test", args.shots)
    items = task.prompt_ids(tok, rows[:args.eval_n], shots, args.max_prompt)
    _, m = run(gen, items, argparse.Namespace(batch_size=64, max_new_tokens=args.max_new_tokens, seed=args.seed), "eval")
    row = dict(kind="eval", step=step, n=m["n"], seconds=m["seconds"], paper=m["paper"]["acc"],
               strict=m["strict"]["acc"], flexible=m["flexible"]["acc"], has_hash=m["has_hash"],
               finished=1 - m["truncated"])
    if engine.rank_world()[0] == 0:
        print(f"eval @ step {step}: paper {row['paper']:.1%}  strict {row['strict']:.1%}  "
              f"flexible {row['flexible']:.1%}  "
              f"'####' present {row['has_hash']:.1%}  ({row['seconds']:.0f}s)")
    return row


def print_report(report, args, n):
    print(f"\n{args.model} on {args.data} [{args.split}], {n} problems, greedy, {args.max_new_tokens} new tokens")
    print(f"{'':8s} " + " ".join(f"{k:>24s}" for k in METRICS) + f" {'####':>6s} {'trunc':>6s} {'tokens':>7s} {'time':>6s}")
    cell = lambda x: f"{x['acc']:6.1%} [{x['ci95'][0]:5.1%}, {x['ci95'][1]:5.1%}]"  # noqa: E731
    for k, m in report["models"].items():
        print(f"{k:8s} " + " ".join(f"{cell(m[x]):>24s}" for x in METRICS) + f" {m['has_hash']:6.1%} "
              f"{m['truncated']:6.1%} {m['mean_tokens']:7.1f} {m['seconds']:5.0f}s")
    for k, c in report.get("compare", {}).items():
        print(f"{k}: adapter − base = {c['diff']:+.1%} ({c['adapter_only']} gained, {c['base_only']} lost), "
              f"McNemar p = {c['p_value']:.2g} -> {'significant' if c['significant'] else 'not significant'} at 5%")


def main(argv=None):
    args = get_args(argv)
    dev, dtype, backend = engine.resolve_runtime(args.device, args.dtype, args.backend)
    rank, world, dev = engine.init_distributed(dev, args.dist_timeout)  # torchrun: each rank scores its share
    rows, shots = task.load_task(args.data, args.split, args.shots, args.val)
    rows = rows[:args.limit] if args.limit else rows
    protocol = dict(decoding="greedy", prompt="chat template: K solved train problems as earlier turns, then question + "
                    + json.dumps(task.SUFFIX), shots=len(shots), paper="verl: last '#### N' in the last 300 chars == gold as a string",
                    strict="number after the last '####' == gold, reply ended with EOS",
                    flexible="last number in the reply == gold", max_new_tokens=args.max_new_tokens)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"protocol: {json.dumps(protocol)}\nbackend {backend}, device {dev}, dtype {dtype}" + (f", {world} ranks" if world > 1 else ""))

    # ---- model, adapter (v = 0 is the base, bit-identical), prompts, generator
    model, tok = engine.load_model(args.model, dtype=dtype, device=dev)
    items = task.prompt_ids(tok, rows, shots, args.max_prompt)
    if len(items) < len(rows):
        say(f"note: {len(rows) - len(items)} prompts over {args.max_prompt} tokens skipped")
    bank = tinylora.load_adapter(model, args.adapter) if args.adapter else None
    if bank is not None:
        trained = bank.v.detach().clone()
        say(bank.plan_text() + f" (from {args.adapter}, trained on {bank.config.get('base_model')})")
    work = os.path.join(args.work_dir, os.path.basename(os.path.normpath(args.model)))
    sync = args.sync if args.sync != "auto" else "merged" if dtype == torch.float32 else "lora"
    gen = engine.make_generator(backend, model, tok, bank, args.model, work, dtype, args.max_prompt + args.max_new_tokens,
                                args.seed, args.gpu_memory_utilization, sync)

    # ---- evaluate: base (v = 0) and/or adapter, on the same problems
    report = dict(config=vars(args), protocol=protocol, backend=backend, device=dev, dtype=str(dtype), models={},
                  problems={})
    for label in (["base"] if not args.adapter or args.compare else []) + (["adapter"] if args.adapter else []):
        if bank is not None:
            with torch.no_grad():
                bank.v.copy_(trained if label == "adapter" else torch.zeros_like(trained))
            kept = gen.push(bank)
            if label == "adapter" and kept < 0.99:
                say(f"warning: the generator's merged {dtype} weights carry {kept:.0%} of ΔW: "
                    f"this scores another policy (--sync lora is exact)")
        report["problems"][label], report["models"][label] = run(gen, items, args, label)
    if args.compare:
        report["compare"] = {k: compare(report["problems"]["base"], report["problems"]["adapter"], k)
                             for k in METRICS}
    if rank > 0:
        return report
    print_report(report, args, len(items))
    out = args.out or (os.path.join(os.path.dirname(args.adapter), f"eval-{os.path.basename(args.data)}.json") if args.adapter else "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"report: {out}")
    return report


if __name__ == "__main__":
    engine.run_cli(main)
