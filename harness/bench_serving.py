"""
The serving benchmark: many TinyLoRA adapters of one base in one batch, against the same base, the
same requests served adapter after adapter, PEFT's LoRA mixed batch and vLLM's multi-LoRA, all in
one regime, so that every ratio compares like with like.

    python -m harness.bench --serving MODEL [OUT.json]     # docs/serving/: what ran here

The regime, for every engine: the same n requests (n distinct short prompts), greedy, exactly
--max-new tokens each (no early stop); prompt processing included (HF has no prefix cache; vLLM's
engines are built with prefix caching off); one uncounted warm-up repetition (vLLM loads the
requested LoRAs there, PEFT before it), then `reps` timed repetitions: their median, min and max,
and new tokens/s at the median. K adapters are held; the requests name min(K, n) of them, spread
evenly. Chosen here:
 1. The same adapters for every engine: random v (N(0, 0.05²)), exported as their exact rank-r
    LoRAs (B = U Σ R, A = Vᵀ) for PEFT and vLLM; vLLM's LoRA slots are its smallest rank that
    holds r (8 for r = 2), `max_loras` of them (what one scheduled batch can mix), every LoRA
    cached on the CPU; its ratios are against its base served by the LoRA-enabled engine (the
    plain engine's base is beside it).
 2. Rows that cannot run in the time a benchmark has are skipped and say so, with what was measured
    (PEFT loads each LoRA into the model: K = 1,024 of them is not loaded; one adapter after another
    at K = n is n batches of one).
"""
import os
import statistics
import tempfile
import time

import torch

import tinylora
from harness import engine, export, models, scale
from harness.files import write_json

# a rank-2 LoRA on Qwen2.5-7B: r (in + out) per module, q k v o gate up down, 28 layers
LORA_7B = 2 * 28 * (7168 + 4096 + 4096 + 7168 + 3 * 22528)


def timed(run, reps):
    """run() once uncounted, then reps times: (seconds of each)."""
    run()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        out.append(time.perf_counter() - t0)
    return out


def row(engine_name, K, seconds, tokens, **facts):
    """One table row: the repetitions' seconds, median/min/max, tokens/s at the median."""
    median = statistics.median(seconds)
    return dict(engine=engine_name, K=K, seconds=seconds, median_s=median, min_s=min(seconds),
                max_s=max(seconds), tokens_per_s=tokens / median, prompt_processing_included=True,
                **facts)


def hf_generate(model, tok, prompts, max_new, **kw):
    """A function answering prompts in one greedy HF generate of exactly max_new tokens each."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = scale.left_pad(prompts, max(map(len, prompts)), pad)  # (b, L), left-padded

    def run():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                           min_new_tokens=max_new, do_sample=False, pad_token_id=pad, **kw)
    return run


def adapter_of_request(K, n):
    """Which adapter (1..K) each of n requests names: n / K consecutive requests each, or n
    distinct adapters spread over 1..K when K >= n."""
    return [1 + i * K // n for i in range(n)]


def random_vs(K, shape, seed=0):
    """The v of K benchmark adapters after the base's zeros: (1 + K, groups, u), N(0, 0.05²)."""
    g = torch.Generator().manual_seed(seed + K)
    return torch.cat([torch.zeros(1, *shape), 0.05 * torch.randn(K, *shape, generator=g)])


def bench_hf(model, tok, prompts, Ks, max_new, reps):
    """The base, TinyLoRA's mixed batch per K, and (K < n) the same requests adapter after
    adapter; the bank (to export the same adapters for PEFT and vLLM)."""
    n, tokens = len(prompts), len(prompts) * max_new
    rows = [row("HF base", 0, timed(hf_generate(model, tok, prompts, max_new), reps), tokens,
                distinct_adapters_per_batch=0)]
    bank = tinylora.apply_tinylora(model, params=13)
    for K in Ks:
        bank.vs, ks = random_vs(K, bank.v.shape), adapter_of_request(K, n)
        bank.adapter_of_row = torch.tensor(ks)
        rows.append(row("TinyLoRA mixed batch (HF)", K, timed(hf_generate(model, tok, prompts,
                                                                         max_new), reps),
                        tokens, distinct_adapters_per_batch=len(set(ks))))
        bank.adapter_of_row = None
        if len(set(ks)) < n:  # adapter after adapter: batches of n / K
            rows.append(row("one adapter after another (HF)", K,
                            timed(lambda: sequential(model, tok, prompts, ks, bank, max_new), reps),
                            tokens, distinct_adapters_per_batch=1))
        print(rows[-1], flush=True)
    return rows, bank


def sequential(model, tok, prompts, ks, bank, max_new):
    """The requests served adapter after adapter with the training forward (one v at a time)."""
    for k in dict.fromkeys(ks):
        with torch.no_grad():
            bank.v.copy_(bank.vs[k])
        hf_generate(model, tok, [p for p, j in zip(prompts, ks) if j == k], max_new)()


def bench_peft(model, tok, prompts, loras, max_new, reps):
    """PEFT's LoRA mixed batch (adapter_names=) on the same requests, per K it can load."""
    from peft import PeftModel
    rows, n = [], len(prompts)
    for K, folders in loras.items():
        ks = adapter_of_request(K, n)
        t0 = time.perf_counter()
        first, *rest = folders
        peft = PeftModel.from_pretrained(model, folders[first], adapter_name=f"a{first}")
        for k in rest:
            peft.load_adapter(folders[k], adapter_name=f"a{k}")
        load_s = time.perf_counter() - t0
        run = hf_generate(peft, tok, prompts, max_new, adapter_names=[f"a{k}" for k in ks])
        held = sum(p.numel() * p.element_size() for n_, p in peft.named_parameters()
                   if f".a{first}." in n_)
        rows.append(row("PEFT LoRA mixed batch (HF)", K, timed(run, reps), n * max_new,
                        distinct_adapters_per_batch=len(set(ks)), load_s=load_s,
                        bytes_per_adapter=held))
        model = peft.unload()
        print(rows[-1], flush=True)
    return rows


def bench_vllm(folder, prompts, loras, r, max_new, reps, max_loras):
    """vLLM, prefix caching off: its plain engine's base, then a LoRA-enabled engine's base and
    multi-LoRA per K (max_loras slots of its smallest rank holding r, every LoRA on the CPU)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    n, tokens = len(prompts), len(prompts) * max_new
    sp = SamplingParams(temperature=0, max_tokens=max_new, min_tokens=max_new, ignore_eos=True)
    reqs = [dict(prompt_token_ids=p) for p in prompts]
    rows = []
    for lora_rank in (None, r):
        kw = engine.vllm_kwargs(folder, "float32", max(map(len, prompts)) + max_new, 0, 0.4,
                                lora_rank, max_loras=max_loras,
                                max_cpu_loras=max(len(f) for f in loras.values()))
        llm = LLM(**kw, enable_prefix_caching=False)
        name = "vLLM base, plain engine" if lora_rank is None else "vLLM base, LoRA engine"
        rows.append(row(name, 0, timed(lambda: llm.generate(reqs, sp, use_tqdm=False), reps),
                        tokens, distinct_adapters_per_batch=0))
        for K, folders in loras.items() if lora_rank else []:
            ks = adapter_of_request(K, n)
            requests = [LoRARequest(f"K{K}a{k}", K * 10 ** 5 + k, folders[k]) for k in ks]
            rows.append(row("vLLM multi-LoRA", K, timed(lambda: llm.generate(
                reqs, sp, use_tqdm=False, lora_request=requests), reps), tokens,
                distinct_adapters_per_batch=min(len(set(ks)), max_loras),
                slot_rank=kw["max_lora_rank"], max_loras=max_loras))
            print(rows[-1], flush=True)
        engine.shutdown(llm)
    return rows


def benchmark(spec, Ks=(1, 64, 1024), n=1024, max_new=8, reps=3, max_loras=64, peft_Ks=(1, 64),
              out=None):
    """Every engine on the same n requests (prompts 'a + b =', a, b in 1..32), reps timed
    repetitions each: the rows (also written to `out` as JSON) and the table printed."""
    model, tok = models.load_model(spec)
    prompts = [tok(f"{a} + {b} =", add_special_tokens=False)["input_ids"]
               for a in range(1, 33) for b in range(1, 33)][:n]
    rows, bank = bench_hf(model, tok, prompts, Ks, max_new, reps)
    with tempfile.TemporaryDirectory() as work:  # each K's adapters the requests name, as LoRAs
        loras = {K: export.write_loras(bank, random_vs(K, bank.v.shape),
                                 dict.fromkeys(adapter_of_request(K, n)),
                                 os.path.join(work, f"K{K}")) for K in Ks}
        folder = engine.hf_folder(model, tok, bank, spec, work)
        tinylora.remove_tinylora(model)
        rows += bench_peft(model, tok, prompts, {K: loras[K] for K in peft_Ks}, max_new, reps)
        try:
            engine.vllm_env()
            rows += bench_vllm(folder, prompts, loras, bank.config["r"], max_new, reps, max_loras)
        except ImportError:
            print("vLLM is not installed: its rows are skipped")
    res = dict(model=spec, requests=n, prompt_tokens=sum(map(len, prompts)) / n,
               new_tokens=max_new, reps=reps, bytes_per_adapter_tinylora=bank.v.numel() * 4,
               lora_7b_numbers=LORA_7B, rows=rows)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_json(out, res)
    print(table(res))
    return res


def table(res):
    """The markdown table: tokens/s (median, min-max) and each ratio against its engine's base."""
    base = {r["engine"]: r for r in res["rows"] if r["K"] == 0}
    lines = [f"{res['requests']} requests × {res['new_tokens']} new tokens, greedy, prompts of "
             f"{res['prompt_tokens']:.1f} tokens; prompt processing included; {res['reps']} "
             "repetitions after a warm-up: new tokens/s at the median [min, max], ÷ its base",
             "| engine | K held | distinct adapters a batch | new tokens/s | ÷ base |",
             "| --- | ---: | ---: | --- | --- |"]
    for r in res["rows"]:
        of = (base.get("vLLM base, LoRA engine") if r["engine"].startswith("vLLM multi")
              else base.get("HF base") if "HF" in r["engine"] else None)
        lo, hi = (res["requests"] * res["new_tokens"] / r[k] for k in ("max_s", "min_s"))
        ratio = f"{r['tokens_per_s'] / of['tokens_per_s']:.2f}×" if of and r["K"] else ""
        lines.append(f"| {r['engine']} | {r['K']:,} | {r['distinct_adapters_per_batch']:,} | "
                     f"{r['tokens_per_s']:.0f} [{lo:.0f}, {hi:.0f}] | {ratio} |")
    return "\n".join(lines)
