"""
Evaluation: one model, prompt, greedy decoding and extractor set, with and without an adapter.

    python eval.py --adapter runs/gsm8k/adapter.safetensors --compare        # Qwen2.5-7B-Instruct

The protocol, printed with every report: greedy, task.py's prompt and scores (paper: verl's rule,
the paper's metric; strict: ours; flexible: the last number), the whole test split unless --limit.
Where the paper is silent:
 1. 95% intervals are Wilson score intervals (harness/stats.py: sound near 0% and 100%).
 2. --compare scores base and adapter on the same problems, the base being the adapted model at
    v = 0 (bit-identical to the untouched one, tested), with an exact McNemar test on the pairs.
 3. With vLLM the adapter reaches the engine exactly: as the rank-r LoRA on a bf16 generator (a bf16
    merge rounds most of a small ΔW away), as merged fp32 weights W0 + ΔW on an fp32 one.
"""
import json
import os
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import rollout
import task
import tinylora
from harness import config, export, models, report, scale
from harness.stats import mcnemar_exact, wilson

METRICS = ("paper", "strict", "flexible")
PROTOCOL = dict(decoding="greedy",
                prompt="chat template: K solved train problems as earlier turns, then question + "
                + json.dumps(task.SUFFIX),
                paper="verl: last '#### N' in the last 300 chars == gold as a string",
                strict="number after the last '####' == gold, reply ended with EOS",
                flexible="last number in the reply == gold")

# ---- Scores: pure functions ------------------------------------------------------------------
def summarize(results):
    """Accuracies with intervals, lengths, truncation and unparseable counts over score dicts."""
    n, out = len(results), dict(n=len(results))
    for k in METRICS:
        hits = sum(r[k] for r in results)
        out[k] = dict(acc=hits / n, correct=hits, ci95=list(wilson(hits, n)))
    return dict(out, has_hash=sum(r["has_hash"] for r in results) / n,
                mean_tokens=sum(r["n_tokens"] for r in results) / n,
                truncated=sum(not r["finished"] for r in results) / n,
                unparseable=sum(r["unparseable"] for r in results))

def compare(base, adapted, key="strict"):
    """Paired comparison of two result lists on the same problems."""
    b = sum(x[key] and not y[key] for x, y in zip(base, adapted))  # right only without the adapter
    c = sum(y[key] and not x[key] for x, y in zip(base, adapted))  # right only with it
    p = mcnemar_exact(b, c)
    return dict(metric=key, base_only=b, adapter_only=c, diff=(c - b) / len(base), p_value=p,
                significant=p < 0.05)

# ---- Scoring: greedy replies and their verdicts ----------------------------------------------
def run_eval(generator, items, max_new_tokens, seed, batch_size=64, label="eval"):
    """Greedy replies to items [(row, prompt ids)] and their verdicts: (per-problem results,
    summary). Under torchrun each rank answers a contiguous 1/world; every rank gets all results."""
    rank, world = scale.rank_world()
    mine = items[rank * len(items) // world:(rank + 1) * len(items) // world]
    t0, comps = time.time(), []
    size = batch_size if generator.llm is None else max(1, len(mine))  # vLLM batches itself
    for s in tqdm(range(0, len(mine), size), desc=label, disable=rank > 0 or size >= len(mine)):
        comps += generator.generate([p for _, p in mine[s:s + size]], 1, max_new_tokens, 0.0, seed)
    res = scale.gather([dict(question=r["question"], gold=r["gold"], reply=c["text"],
                             **task.score(c["text"], r, c["finished"], len(c["ids"])))
                        for (r, _), c in zip(mine, comps)])
    return res, dict(summarize(res), seconds=time.time() - t0)

def heldout(generator, tok, args, step):
    """The trainers' check: greedy accuracies on the first --eval-n held-out problems, as a log
    record with every problem's verdict and reply."""
    problems, shots = task.load_task(args.data, "test", args.shots)
    items = task.prompt_ids(tok, problems[:args.eval_n], shots, args.max_prompt)
    res, m = run_eval(generator, items, args.max_new_tokens, args.seed)
    record = dict(kind="eval", step=step, n=m["n"], seconds=m["seconds"],
                  paper=m["paper"]["acc"], strict=m["strict"]["acc"], flexible=m["flexible"]["acc"],
                  has_hash=m["has_hash"], finished=1 - m["truncated"],
                  right=[int(r["strict"]) for r in res], questions=[r["question"] for r in res],
                  replies=[r["reply"] for r in res])
    if scale.rank_world()[0] == 0:
        print(f"eval @ step {step}: paper {record['paper']:.1%}  strict {record['strict']:.1%}  "
              f"flexible {record['flexible']:.1%}  '####' present {record['has_hash']:.1%}  "
              f"({record['seconds']:.0f}s)")
    return record


def main(argv=None):
    args = config.eval_args(argv, __doc__.split("\n")[1])
    rt = models.runtime(args.device, args.dtype, args.backend, args.dist_timeout)  # + ranks
    problems, shots = task.load_task(args.data, args.split, args.shots, args.val)
    problems = problems[:args.limit]  # None: all
    protocol = dict(PROTOCOL, shots=len(shots), max_new_tokens=args.max_new_tokens)
    say = print if rt.rank == 0 else (lambda *a, **k: None)
    say(f"protocol: {json.dumps(protocol)}\nbackend {rt.backend}, device {rt.device}, dtype "
        f"{rt.dtype}" + (f", {rt.world} ranks" if rt.world > 1 else ""))

    # ---- model, adapter (v = 0 is the base, bit-identical), prompts, generator
    model, tok = models.load_model(args.model, rt.dtype, rt.device)
    items = task.prompt_ids(tok, problems, shots, args.max_prompt)
    if len(items) < len(problems):
        say(f"note: {len(problems) - len(items)} prompts over {args.max_prompt} tokens skipped")
    bank = tinylora.load_adapter(model, args.adapter) if args.adapter else None
    if bank is not None:
        trained = bank.v.detach().clone()
        say(f"{export.bank_plan(bank)} (from {args.adapter}, base {bank.config['base_model']})")
    work = os.path.join(args.work_dir, os.path.basename(os.path.normpath(args.model)))
    generator = rollout.make_generator(rt.backend, model, tok, bank, args.model, work,
                                       args.max_prompt + args.max_new_tokens, args.seed,
                                       gpu_memory_utilization=args.gpu_memory_utilization,
                                       sync="merged" if rt.dtype == torch.float32 else "lora")

    # ---- evaluate: base (v = 0) and/or adapter, on the same problems
    results = dict(config=vars(args), protocol=protocol, backend=rt.backend, device=rt.device,
                  dtype=str(rt.dtype), models={}, problems={})
    labels = ["base"] if not args.adapter or args.compare else []
    if args.adapter:  # exactly, merged into bf16 weights as the paper scored it, or both
        labels += {"exact": ["adapter"], "merged-bf16": ["merged-bf16"]}.get(
            args.route, ["adapter", "merged-bf16"])
    for label in labels:
        if bank is not None:
            with torch.no_grad():
                bank.v.copy_(torch.zeros_like(trained) if label == "base" else trained)
            generator.push(bank)
        with export.merged_route(generator, bank) if label == "merged-bf16" else nullcontext():
            results["problems"][label], results["models"][label] = run_eval(
                generator, items, args.max_new_tokens, args.seed, args.batch_size, label)
    pairs = [("base", label) for label in labels[1:]] if args.compare else []
    pairs += [("adapter", "merged-bf16")] if args.route == "both" and args.adapter else []
    results["compare"] = {f"{a} vs {b}": {k: compare(results["problems"][a],
                                                       results["problems"][b], k)
                                           for k in METRICS} for a, b in pairs}
    if rt.rank == 0:  # the table, the paired comparison and the JSON report (--out)
        report.print_report(results, args, len(items), METRICS)
    return results

if __name__ == "__main__":
    config.run_cli(main)
