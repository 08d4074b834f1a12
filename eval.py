"""
Evaluation: one model, prompt, decoding and extractor set, with and without an adapter.

    python eval.py --adapter runs/gsm8k/adapter.safetensors --compare        # Qwen2.5-7B-Instruct
    python eval.py --suite math --adapter runs/math/adapter.safetensors --compare   # Table 2's six

The protocol, printed with every report: greedy, task.py's prompt and scores (paper: verl's rule,
the paper's metric; strict: ours; flexible: the last number), the whole test split unless --limit.
--suite math: GSM8K, MATH500, Minerva Math, OlympiadBench, AIME24 and AMC23 with SimpleRL's
qwen-boxed prompt, scored by Qwen2.5-Math's answer extraction and Math-Verify's equivalence
(verl's string rule beside it), greedy or avg@k sampled as the fork (--samples k). Where the paper
is silent:
 1. 95% intervals are Wilson score intervals (harness/stats.py: sound near 0% and 100%).
 2. --compare scores base and adapter on the same problems, the base being the adapted model at
    v = 0 (bit-identical to the untouched one, tested), with an exact McNemar test on the pairs
    (avg@k: each problem's majority of its k replies).
 3. With vLLM the adapter reaches the engine exactly: as the rank-r LoRA on a bf16 generator (a bf16
    merge rounds most of a small ΔW away), as merged fp32 weights W0 + ΔW on an fp32 one.
"""
import os
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import rollout
import task
import tinylora
from harness import config, data, export, mathnorm, models, report, scale
from harness.stats import mcnemar_exact, wilson

METRICS = ("paper", "strict", "flexible")
MATH_METRICS = ("math-verify", "math")  # Table 2's grading; verl's string rule (the MATH reward)
SUITES = {"math": tuple(data.BENCHMARKS)}  # Table 2's six benchmarks, in its order
# ---- Scores: pure functions ------------------------------------------------------------------
def math_score(reply, problem, finished, n_tokens):
    """A MATH reply's verdicts: its answer (Qwen2.5-Math's extraction) equals the gold by
    Math-Verify; verl's string rule (the training reward); and what it holds."""
    pred = mathnorm.qwen_extract(reply)
    right = bool(pred) and mathnorm.verified(f"\\boxed{{{pred}}}", problem["answer"])
    return {"math-verify": right, "math": task.reward(reply, problem, finished, "math") == 1.0,
            "finished": bool(finished), "n_tokens": n_tokens}

def summarize(results, metrics=METRICS, samples=1):
    """Accuracies with intervals (avg@k: over every reply), lengths, truncation, and for GSM8K the
    '####' and unparseable counts, over per-problem verdicts (avg@k: the share of k replies)."""
    n, out = len(results), dict(n=len(results))
    for k in metrics:
        hits = sum(r[k] for r in results)
        out[k] = dict(acc=hits / n, correct=hits, ci95=list(wilson(round(hits * samples),
                                                                   n * samples)))
    if "has_hash" in results[0]:
        out.update(has_hash=sum(r["has_hash"] for r in results) / n,
                   unparseable=sum(r["unparseable"] for r in results))
    return dict(out, mean_tokens=sum(r["n_tokens"] for r in results) / n,
                truncated=sum(1 - r["finished"] for r in results) / n)

def compare(base, adapted, key="strict"):
    """Paired comparison of two result lists on the same problems (avg@k: majority verdicts)."""
    b = sum(x[key] >= 0.5 > y[key] for x, y in zip(base, adapted))  # right only without adapter
    c = sum(y[key] >= 0.5 > x[key] for x, y in zip(base, adapted))  # right only with it
    p = mcnemar_exact(b, c)
    return dict(metric=key, base_only=b, adapter_only=c, diff=(c - b) / len(base), p_value=p,
                significant=p < 0.05)

# ---- Scoring: greedy replies and their verdicts ----------------------------------------------
def run_eval(generator, items, max_new_tokens, seed, batch_size=64, label="eval", *,
             score=task.score, metrics=METRICS, samples=1):
    """Replies to items [(problem, prompt ids)], greedy or (samples > 1) the fork's sampling, and
    their verdicts: (per-problem results, summary). Under torchrun each rank answers a contiguous
    1/world; every rank gets all results."""
    rank, world = scale.rank_world()
    mine = items[rank * len(items) // world:(rank + 1) * len(items) // world]
    t0, comps, k = time.time(), [], samples
    size = batch_size if generator.llm is None else max(1, len(mine))  # vLLM batches itself
    for s in tqdm(range(0, len(mine), size), desc=label, disable=rank > 0 or size >= len(mine)):
        comps += generator.generate([p for _, p in mine[s:s + size]], k, max_new_tokens,
                                    0.0 if k == 1 else 1.0, seed, top_p=1.0 if k == 1 else 0.95)
    res = []
    for i, (problem, _) in enumerate(mine):  # avg@k: each verdict the share of k replies
        cs = comps[i * k:(i + 1) * k]
        verdicts = [score(c["text"], problem, c["finished"], len(c["ids"])) for c in cs]
        res.append(dict(question=problem["question"], gold=problem["answer"], reply=cs[0]["text"],
                        **{key: sum(v[key] for v in verdicts) / k if k > 1 else verdicts[0][key]
                           for key in verdicts[0]}))
    res = scale.gather(res)
    return res, dict(summarize(res, metrics, k), seconds=time.time() - t0)

def heldout(generator, tok, args, step):
    """The trainers' check: greedy accuracies on the first --eval-n held-out problems, as a log
    record with every problem's verdict and reply (right: by strict, or by the MATH reward)."""
    problems, shots = task.load_task(args.data, "test", args.shots)
    items = task.prompt_ids(tok, problems[:args.eval_n], shots, args.max_prompt, args.prompt)
    how = dict(score=math_score, metrics=MATH_METRICS) if args.reward in MATH_METRICS else {}
    res, m = run_eval(generator, items, args.max_new_tokens, args.seed, **how)
    key, metrics = (args.reward, MATH_METRICS) if how else ("strict", METRICS)
    record = dict(kind="eval", step=step, n=m["n"], seconds=m["seconds"],
                  **{k: m[k]["acc"] for k in metrics}, **{k: m[k] for k in ["has_hash"] if k in m},
                  finished=1 - m["truncated"], right=[int(r[key]) for r in res],
                  questions=[r["question"] for r in res], replies=[r["reply"] for r in res],
                  **(dict(metric=key) if how else {}))
    shown = [f"{k} {record[k]:.1%}" for k in metrics] + [
        f"'####' present {record['has_hash']:.1%}" for _ in ["has_hash"] if "has_hash" in record]
    if scale.rank_world()[0] == 0:
        print(f"eval @ step {step}: {'  '.join(shown)}  ({record['seconds']:.0f}s)")
    return record

def evaluate(generator, bank, labels, items, args, **how):
    """Each label's (base: v = 0; adapter; merged-bf16) replies and verdicts on the same items:
    ({label: per-problem results}, {label: summary}); how: run_eval's keyword options."""
    trained = bank.v.detach().clone() if bank is not None else None
    problems, models = {}, {}
    for label in labels:
        if bank is not None:
            with torch.no_grad():
                bank.v.copy_(torch.zeros_like(trained) if label == "base" else trained)
            generator.push(bank)
        with export.merged_route(generator, bank) if label == "merged-bf16" else nullcontext():
            problems[label], models[label] = run_eval(generator, items, args.max_new_tokens,
                                                      args.seed, args.batch_size, label, **how)
    if bank is not None:  # the adapter's v back, whatever was evaluated last
        with torch.no_grad():
            bank.v.copy_(trained)
    return problems, models

def main(argv=None):
    args = config.eval_args(argv, __doc__.split("\n")[1])
    runtime = models.runtime(args.device, args.dtype, args.backend, args.dist_timeout)  # + ranks
    say = print if runtime.rank == 0 else (lambda *a, **k: None)

    # ---- model, adapter (v = 0 is the base, bit-identical), generator: one for every benchmark
    model, tok = models.load_model(args.model, runtime.dtype, runtime.device)
    bank = tinylora.load_adapter(model, args.adapter) if args.adapter else None
    if bank is not None:
        say(f"{export.bank_plan(bank)} (from {args.adapter}, base {bank.config['base_model']})")
    work = os.path.join(args.work_dir, os.path.basename(os.path.normpath(args.model)))
    generator = rollout.make_generator(runtime.backend, model, tok, bank, args.model, work,
                                       args.max_prompt + args.max_new_tokens, args.seed,
                                       gpu_memory_utilization=args.gpu_memory_utilization,
                                       sync="merged" if runtime.dtype == torch.float32 else "lora")
    labels = ["base"] if not args.adapter or args.compare else []
    if args.adapter:  # exactly, merged into bf16 weights as the paper scored it, or both
        labels += {"exact": ["adapter"], "merged-bf16": ["merged-bf16"]}.get(
            args.route, ["adapter", "merged-bf16"])
    pairs = [("base", label) for label in labels[1:]] if args.compare else []
    pairs += [("adapter", "merged-bf16")] if args.route == "both" and args.adapter else []

    # ---- evaluate: the task's test split, or each benchmark of the suite
    protocol = (dict(report.MATH_PROTOCOL, samples=args.samples) if args.suite
                else dict(report.PROTOCOL))
    results = dict(config=vars(args), backend=runtime.backend, device=runtime.device,
                   dtype=str(runtime.dtype), protocol=dict(protocol,
                                                           max_new_tokens=args.max_new_tokens))
    for name in SUITES[args.suite] if args.suite else [None]:
        if name is None:
            problems, shots = task.load_task(args.data, args.split, args.shots, args.val)
        else:  # Table 2's benchmarks: SimpleRL's layout under --data, else the hub
            problems, shots = data.benchmark_problems(name, args.data), []
        problems = problems[:args.limit]  # None: all
        items = task.prompt_ids(tok, problems, shots, args.max_prompt, args.prompt)
        if len(items) < len(problems):
            say(f"note: {len(problems) - len(items)} prompts over {args.max_prompt} tokens skipped")
        math = name is not None or args.reward in MATH_METRICS  # a MATH run's own rule
        how = dict(score=math_score, metrics=MATH_METRICS, samples=args.samples) if math else {}
        per_problem, summaries = evaluate(generator, bank, labels, items, args, **how)
        found = dict(models=summaries, problems=per_problem, compare={
            f"{a} vs {b}": {k: compare(per_problem[a], per_problem[b], k)
                            for k in how.get("metrics", METRICS)} for a, b in pairs})
        if name is None:  # the task's report, as ever: its protocol says the shots
            results.update(found, protocol=dict(results["protocol"], shots=len(shots)))
        else:
            results.setdefault("benchmarks", {})[name] = found
    if runtime.rank == 0:  # the table(s), the paired comparisons and the JSON report (--out)
        report.print_report(results, args, MATH_METRICS if math else METRICS)
    return results

if __name__ == "__main__":
    config.run_cli(main)
