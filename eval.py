"""
Evaluation: one model, prompt, greedy decoding and extractor set, with and without an adapter.

    python eval.py --adapter runs/gsm8k/adapter.safetensors --compare        # Qwen2.5-7B-Instruct

The protocol, printed with every report: greedy, task.py's prompt and scores (paper: verl's rule,
the paper's metric; strict: ours; flexible: the last number), the whole test split unless --limit.
Where the paper is silent:
 1. 95% intervals are Wilson score intervals (sound near 0% and 100%, unlike the normal one).
 2. --compare scores base and adapter on the same problems, the base being the adapted model at
    v = 0 (bit-identical to the untouched one, tested), with an exact McNemar test on the pairs.
 3. With vLLM the adapter reaches the engine exactly: as the rank-r LoRA on a bf16 generator (a bf16
    merge rounds most of a small ΔW away), as merged fp32 weights W0 + ΔW on an fp32 one.
"""
import json
import math
import os
import time
from contextlib import nullcontext

import torch

import rollout
import task
import tinylora
from harness import export, models, run, scale

METRICS = ("paper", "strict", "flexible")
PROTOCOL = dict(decoding="greedy",
                prompt="chat template: K solved train problems as earlier turns, then question + "
                + json.dumps(task.SUFFIX),
                paper="verl: last '#### N' in the last 300 chars == gold as a string",
                strict="number after the last '####' == gold, reply ended with EOS",
                flexible="last number in the reply == gold")

# ---- Statistics: pure functions -----------------------------------------------------------------
def wilson(k, n, z=1.959964):
    """95% Wilson score interval for k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    p, d = k / n, 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, mid - half), min(1.0, mid + half))

def mcnemar_exact(b, c):
    """Two-sided exact McNemar p-value: b = right only in A, c = right only in B (binomial, 1/2)."""
    tail = sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c)
    return min(1.0, 2 * tail)

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

# ---- Scoring ----------------------------------------------------------------------------------
def run_eval(generator, items, max_new_tokens, seed, batch_size=64, label="eval"):
    """Greedy replies to items [(row, prompt ids)] and their verdicts: (per-problem results,
    summary). Under torchrun each rank answers a contiguous 1/world; every rank gets all results."""
    from tqdm import tqdm
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

def get_args(argv=None):
    import train_grpo  # its flags: the same model, data and generator settings as training
    ap = run.new_parser(__doc__.split("\n")[1])
    for add in (train_grpo.model_flags, train_grpo.data_flags, train_grpo.generator_flags,
                scale.dist_flags):
        add(ap)
    g = ap.add_argument_group("evaluation")
    g.add_argument("--adapter", default=None, help="a TinyLoRA adapter (.safetensors)")
    g.add_argument("--compare", action="store_true", help="evaluate base and adapter in one run")
    g.add_argument("--route", default="exact", choices=["exact", "merged-bf16", "both"],
                   help="the adapter exactly, or merged into bf16 weights as the paper scored it")
    g.add_argument("--split", default="test", help="test, or val (the last --val train problems)")
    g.add_argument("--limit", type=int, default=None, help="first N problems only")
    g.add_argument("--batch-size", type=int, default=64, help="prompts per HF generate call")
    g.add_argument("--out", default=None, help="JSON report (default: next to the adapter)")
    g.add_argument("--work-dir", default=".cache", help="where vLLM's copy of a .gguf model goes")
    args = ap.parse_args(argv)
    if args.compare and not args.adapter:
        raise ValueError("--compare needs --adapter")
    if args.adapter and not os.path.isfile(args.adapter):
        raise ValueError(f"adapter file not found: {args.adapter}")
    models.check_paths(args.model, args.data)
    run.check_gpu_recipe(args)
    if args.limit is not None and args.limit < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError("--limit, --max-new-tokens and --batch-size must be >= 1")
    return args

def main(argv=None):
    args = get_args(argv)
    rt = models.runtime(args.device, args.dtype, args.backend, args.dist_timeout)  # + ranks
    rows, shots = task.load_task(args.data, args.split, args.shots, args.val)
    rows = rows[:args.limit]  # None: all
    protocol = dict(PROTOCOL, shots=len(shots), max_new_tokens=args.max_new_tokens)
    say = print if rt.rank == 0 else (lambda *a, **k: None)
    say(f"protocol: {json.dumps(protocol)}\nbackend {rt.backend}, device {rt.device}, dtype "
        f"{rt.dtype}" + (f", {rt.world} ranks" if rt.world > 1 else ""))

    # ---- model, adapter (v = 0 is the base, bit-identical), prompts, generator
    model, tok = models.load_model(args.model, rt.dtype, rt.device)
    items = task.prompt_ids(tok, rows, shots, args.max_prompt)
    if len(items) < len(rows):
        say(f"note: {len(rows) - len(items)} prompts over {args.max_prompt} tokens skipped")
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
    report = dict(config=vars(args), protocol=protocol, backend=rt.backend, device=rt.device,
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
            report["problems"][label], report["models"][label] = run_eval(
                generator, items, args.max_new_tokens, args.seed, args.batch_size, label)
    pairs = [("base", label) for label in labels[1:]] if args.compare else []
    pairs += [("adapter", "merged-bf16")] if args.route == "both" and args.adapter else []
    report["compare"] = {f"{a} vs {b}": {k: compare(report["problems"][a], report["problems"][b],
                                                      k) for k in METRICS} for a, b in pairs}
    if rt.rank == 0:  # the table, the paired comparison and the JSON report (--out)
        run.eval_report(report, args, len(items), METRICS)
    return report

if __name__ == "__main__":
    run.run_cli(main)
