"""
Many TinyLoRA adapters of one base served in one batch: each request names its adapter and a
batch mixes them freely (tinylora.load_adapters: the adapters' v stacked, each row its own R
between projections the whole batch shares).

    python -m harness.serve --model M --adapters a.safetensors b.safetensors \
        --requests requests.jsonl --out replies.jsonl
    python -m harness.serve --engine vllm ...   # the same requests to vLLM's multi-LoRA

requests.jsonl: one {"adapter": ..., "question": ...} (the task's prompt: --data's shots, the
paper's suffix, the chat template) or {"adapter": ..., "prompt": ...} (that text, as is) per line;
"adapter": a file's name without .safetensors, its place 1..K among --adapters, or 0 / "base".
Writes one JSONL row per request, in order: {adapter, reply, tokens, finished}.

Chosen here:
 1. HF generate on the adapted model, greedy (--temperature 0) or sampled with one seed per request
    (its line number), so a reply does not depend on the batch it was served in.
 2. Batches of --batch-size requests in file order, whatever their adapters; nothing is written
    unless every request is valid and answered (bad input: one line, no file).
 3. vLLM: each adapter exported as its exact rank-r LoRA (B = U Σ R, A = Vᵀ), one LoRARequest per
    request, --max-loras slots (what one batch can mix; more wait their turn).
"""
import os
import time

import torch

import rollout
import task
import tinylora
from harness import config, engine, export, models, scale
from harness.files import read_jsonl, write_jsonl
from harness.account import equation_account


SERVE_DEFAULTS = dict(data="arith", shots=1, prompt="gsm8k", max_prompt=512, max_new_tokens=32)


def get_args(argv=None):
    ap = config.new_parser(__doc__.split("\n")[1])
    ap.add_argument("--model", default=None, help="hub id, local folder or .gguf file (default: "
                    "the base the first adapter records)")
    ap.add_argument("--adapters", nargs="+", required=True, help="adapter files of that base")
    ap.add_argument("--requests", required=True, help="JSONL of {adapter, question | prompt}")
    ap.add_argument("--out", required=True, help="replies, one JSONL row per request")
    ap.add_argument("--data", default=None, help="whose prompt and shots a 'question' gets")
    ap.add_argument("--shots", type=int, default=None)
    ap.add_argument("--prompt", default=None, choices=list(task.PROMPTS))
    ap.add_argument("--max-prompt", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.epilog = ("--data, --shots, --prompt, --max-prompt, --max-new-tokens: the first adapter's "
                 f"run (its config.json) where there is one, else {SERVE_DEFAULTS}")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--max-loras", type=int, default=16, help="vLLM: adapters one batch can mix")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--check-alone", action="store_true",
                    help="serve every adapter's requests again on their own and compare")
    args = ap.parse_args(argv)
    found, sources = config.adapter_defaults(args.adapters[0], tuple(SERVE_DEFAULTS))
    taken = {k: v for k, v in dict(SERVE_DEFAULTS, **found).items() if getattr(args, k) is None}
    vars(args).update(taken)
    if args.model is None:
        raise ValueError(f"{args.adapters[0]} records no base model: give --model")
    said = [f"{where}: " + " ".join(f"--{k.replace('_', '-')} {taken[k]}"
                                    for k in keys if k in taken)
            for where, keys in sources.items() if set(keys) & set(taken)]
    if said:
        print("defaults " + "; ".join(said))
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        raise ValueError(f"--batch-size and --max-new-tokens must be >= 1, --temperature >= 0; "
                         f"got {args.batch_size}, {args.max_new_tokens}, {args.temperature}")
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a folder; name the replies file")
    return args


def adapter_index(paths):
    """{name: index}: 'base' and '0' -> 0, each file's name without .safetensors and its place
    1..K -> its place."""
    names = [os.path.basename(p).removesuffix(".safetensors") for p in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--adapters: two files are named {dup[0]!r}; rename one")
    index = {"base": 0, "0": 0}
    for k, name in enumerate(names, 1):
        index.update({name: k, str(k): k})
    return index


def read_requests(path, index):
    """[(adapter index, request row)] of a requests file, every row checked first."""
    rows = read_jsonl(path) if os.path.isfile(path) else None
    if rows is None:
        raise ValueError(f"--requests {path}: no such file")
    if not rows:
        raise ValueError(f"--requests {path}: no requests in it")
    out = []
    for i, row in enumerate(rows, 1):
        name = str(row.get("adapter", "")) if isinstance(row, dict) else ""
        if name not in index or ("question" in row) == ("prompt" in row):
            raise ValueError(f"{path} line {i}: needs 'adapter' (one of base, "
                             f"{', '.join(k for k in index if not k.isdigit() and k != 'base')}, "
                             f"or 0..{max(index.values())}) and one of 'question' or 'prompt'; "
                             f"got {row!r:.120}")
        out.append((index[name], row))
    return out


def prompt_ids(tok, rows, data, shots, max_prompt, style="gsm8k"):
    """Token ids of each request's prompt: a question in the task's prompt (data's shots, the
    prompt style), a prompt as is."""
    examples = task.load_task(data, "train", shots)[1] if any("question" in r for r in rows) else []
    out = []
    for i, row in enumerate(rows, 1):
        text = (task.build_prompt(tok, row["question"], examples, style) if "question" in row
                else row["prompt"])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not 0 < len(ids) <= max_prompt:
            raise ValueError(f"request {i}: its prompt has {len(ids)} tokens (1..--max-prompt "
                             f"{max_prompt} allowed)")
        out.append(ids)
    return out


def serve_hf(model, tok, bank, batches, max_new, temperature, seed):
    """Replies of batches [(adapter indices, prompt ids, request numbers)]: each batch one HF
    generate, its rows served by their adapters (bank.adapter_of_row)."""
    from tqdm import tqdm
    eos, out = models.eos_ids(model, tok), []
    try:
        for ks, prompts, nums in tqdm(batches, "serve", unit="batch"):
            bank.adapter_of_row = torch.tensor(ks, device=bank.vs.device)
            seeds = rollout.row_seeds(seed, nums, 1) if temperature > 0 else None
            out += rollout.generate_hf(model, tok, prompts, 1, max_new, temperature, eos,
                                       batch_size=len(prompts), seeds=seeds)
    finally:
        bank.adapter_of_row = None
    return out


def serve_vllm(model, tok, bank, args, batches):
    """The same batches on vLLM's multi-LoRA: adapter k as the LoRA of its v (index 0: none)."""
    from vllm.lora.request import LoRARequest
    work = os.path.join(os.path.dirname(os.path.abspath(args.out)), "serve_vllm")
    folders = lora_folders(bank, bank.vs, range(1, len(bank.vs)), work, args.model)
    loras = [None] + [LoRARequest(f"adapter{k}", k, folders[k]) for k in folders]
    llm = engine.make_vllm(engine.hf_folder(model, tok, bank, args.model, work),
                           str(model.dtype).replace("torch.", ""),
                           args.max_prompt + args.max_new_tokens, args.seed,
                           lora_rank=bank.config["r"], max_loras=args.max_loras,
                           max_cpu_loras=len(loras))
    eos, out = models.eos_ids(model, tok), []
    for ks, prompts, _ in batches:
        out += rollout.generate_vllm(llm, tok, prompts, 1, args.max_new_tokens, args.temperature,
                                     eos, lora=[loras[k] for k in ks])
    return out


def in_batches(ks, ids, B, by_adapter=False):
    """[(adapter indices, prompt ids, request numbers)], B requests at a time: in file order, any
    mix of adapters; or (by_adapter) each adapter's requests on their own, one after another."""
    groups = [[i for i, k in enumerate(ks) if k == a] for a in dict.fromkeys(ks)] if by_adapter \
        else [list(range(len(ks)))]
    return [([ks[i] for i in nums], [ids[i] for i in nums], nums)
            for g in groups for nums in (g[s:s + B] for s in range(0, len(g), B))]


def answer(args, model, tok, bank, batches):
    """(completions in request order, seconds) of batches on --engine."""
    t0 = time.time()
    if args.engine == "hf":
        comps = serve_hf(model, tok, bank, batches, args.max_new_tokens, args.temperature,
                         args.seed)
    else:
        comps = serve_vllm(model, tok, bank, args, batches)
    order = [n for _, _, nums in batches for n in nums]
    return [c for _, c in sorted(zip(order, comps), key=lambda x: x[0])], time.time() - t0


def per_adapter(requests, rows):
    """A line per adapter: its requests, and with a 'gold' in them, strict accuracy and the share of
    '####' numbers that are not the last equation's result (harness/account.py)."""
    lines = []
    for name in dict.fromkeys(str(r["adapter"]) for _, r in requests):
        mine = [(r, out) for (_, r), out in zip(requests, rows) if str(r["adapter"]) == name]
        line = f"  {name}: {len(mine)} requests"
        if all("gold" in r for r, _ in mine):
            right = sum(task.reward(o["reply"], r, o["finished"], "strict") for r, o in mine)
            acc = equation_account([r for r, _ in mine], [o["reply"] for _, o in mine])
            line += (f", strict {right / len(mine):.1%}, '####' not the equation's result "
                     f"{acc['copied']:.1%}")
        lines.append(line)
    return "\n".join(lines)


def example(requests, rows):
    """Lines showing the first question (or prompt) asked of several adapters whose replies differ
    among them, '' when there is none."""
    asked = {}
    for (_, r), out in zip(requests, rows):
        text = r.get("question", r.get("prompt"))
        asked.setdefault(text, []).append((r["adapter"], out["reply"]))
    for text, replies in asked.items():
        if len({reply for _, reply in replies}) > 1:
            return "\n".join([f"e.g. {text!r}"] + [f"  {a}: {reply!r}" for a, reply in replies])
    return ""


def main(argv=None):
    args = get_args(argv)
    index = adapter_index(args.adapters)
    requests = read_requests(args.requests, index)
    model, tok = models.load_model(args.model, torch.float32, args.device)
    bank = tinylora.load_adapters(model, args.adapters)
    ids = prompt_ids(tok, [r for _, r in requests], args.data, args.shots, args.max_prompt,
                     args.prompt)
    ks = [k for k, _ in requests]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)  # before the work
    comps, seconds = answer(args, model, tok, bank, in_batches(ks, ids, args.batch_size))
    rows = [dict(adapter=r["adapter"], reply=c["text"], tokens=len(c["ids"]),
                 finished=c["finished"]) for (_, r), c in zip(requests, comps)]
    if args.check_alone:
        alone = answer(args, model, tok, bank, in_batches(ks, ids, args.batch_size, True))[0]
        same = sum(a["ids"] == c["ids"] for a, c in zip(alone, comps))
        print(f"{same} of {len(comps)} replies are the ones each adapter gives served alone")
    write_jsonl(args.out, rows)
    tokens = sum(r["tokens"] for r in rows)
    print(f"served {len(rows)} requests in mixed batches of {args.batch_size}, {len(bank.vs) - 1} "
          f"adapters held ({bank.v.numel() * 4} bytes each in fp32), in {seconds:.1f} s: "
          f"{len(rows) / seconds:.2f} requests/s, {tokens / seconds:.1f} new tokens/s\n"
          f"{per_adapter(requests, rows)}\n{example(requests, rows)}\nreplies: {args.out}")
    return rows


# ---- The benchmark: python -m harness.bench --serving MODEL -------------------------------------
def generate_timed(model, tok, prompts, max_new, reps=2, **kw):
    """Seconds to answer `prompts` in one greedy HF generate of exactly max_new tokens each (no
    early stop: every variant does the same work), the best of reps; kw: PEFT's adapter_names."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = scale.left_pad(prompts, max(map(len, prompts)), pad)  # (b, L), left-padded
    times = []
    for _ in range(reps):
        t0 = time.time()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                           min_new_tokens=max_new, do_sample=False, pad_token_id=pad, **kw)
        times.append(time.time() - t0)
    return min(times)


def rows_of(K, n):
    """Which adapter (1..K) each of n requests names: n / K consecutive requests each, or n
    distinct adapters spread over 1..K when K >= n."""
    return [1 + i * K // n for i in range(n)]


def random_vs(K, shape, seed=0):
    """The v of K benchmark adapters after the base's zeros: (1 + K, groups, u), N(0, 0.05²)."""
    g = torch.Generator().manual_seed(seed + K)
    return torch.cat([torch.zeros(1, *shape), 0.05 * torch.randn(K, *shape, generator=g)])


def bench_ours(model, tok, prompts, Ks, max_new):
    """Tokens/s of the base, of mixed batches holding K adapters, and of the same requests served
    adapter after adapter (today's forward, one v at a time); bytes held per adapter."""
    generate_timed(model, tok, prompts[:4], 2)  # warm-up
    out = dict(base=len(prompts) * max_new / generate_timed(model, tok, prompts, max_new))
    bank = tinylora.apply_tinylora(model, params=13)
    for K in Ks:
        bank.vs, ks = random_vs(K, bank.v.shape), rows_of(K, len(prompts))
        bank.adapter_of_row = torch.tensor(ks)
        out[f"mixed_{K}"] = len(prompts) * max_new / generate_timed(model, tok, prompts, max_new)
        bank.adapter_of_row, seconds = None, 0.0
        for k in dict.fromkeys(ks):
            with torch.no_grad():
                bank.v.copy_(bank.vs[k])
            seconds += generate_timed(model, tok, [p for p, j in zip(prompts, ks) if j == k],
                                      max_new)
        out[f"sequential_{K}"] = len(prompts) * max_new / seconds
        print(f"K = {K}: {out}", flush=True)
    out["bytes_per_adapter"] = bank.vs[1].numel() * bank.vs.element_size()
    tinylora.remove_tinylora(model)  # the base timed again: the faster of first and last counts
    out["base"] = max(out["base"], len(prompts) * max_new / generate_timed(model, tok, prompts,
                                                                            max_new))
    return out, bank


def lora_folders(bank, vs, ks, work, base_model=None):
    """{k: folder under work} for adapters ks, rows of vs (K', groups, u), each written as its exact
    rank-r LoRA (PEFT's format, which vLLM reads); bank.v is left as it was."""
    keep, out = bank.v.detach().clone(), {}
    try:
        for k in ks:
            with torch.no_grad():
                bank.v.copy_(vs[k])
            out[k] = export.write_lora(bank, os.path.join(work, f"lora{k}"), base_model)
    finally:
        with torch.no_grad():
            bank.v.copy_(keep)
    return out


def bench_peft(model, tok, prompts, loras, max_new):
    """PEFT's LoRA mixed batch (adapter_names=) on the same requests: tokens/s per K, load seconds,
    bytes per adapter. loras: {K: {k: folder}}; PEFT loads the adapters the batch names (its
    forward loops over them)."""
    from peft import PeftModel
    out = {}
    for K, folders in loras.items():
        ks = rows_of(K, len(prompts))
        t0 = time.time()
        first, *rest = folders
        peft = PeftModel.from_pretrained(model, folders[first], adapter_name=f"a{first}")
        for k in rest:
            peft.load_adapter(folders[k], adapter_name=f"a{k}")
        out[f"load_s_{K}"] = time.time() - t0
        seconds = generate_timed(peft, tok, prompts, max_new, adapter_names=[f"a{k}" for k in ks])
        out[f"mixed_{K}"] = len(prompts) * max_new / seconds
        out["bytes_per_adapter"] = sum(p.numel() * p.element_size()
                                       for n, p in peft.named_parameters() if f".a{first}." in n)
        model = peft.unload()
        print(f"PEFT, K = {K}: {out}", flush=True)
    return out


def bench_vllm(model, tok, spec, prompts, loras, r, max_new, work, max_loras):
    """vLLM's multi-LoRA on the same requests: tokens/s of its base and per K (max_loras slots of
    rank r, the adapters the requests name held on the CPU; loras as bench_peft's)."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    llm = engine.make_vllm(engine.hf_folder(model, tok, None, spec, work), "float32",
                           max(map(len, prompts)) + max_new, 0, lora_rank=r,
                           max_loras=max_loras, max_cpu_loras=len(prompts))
    sp = SamplingParams(temperature=0, max_tokens=max_new, min_tokens=max_new, ignore_eos=True)
    reqs = [dict(prompt_token_ids=p) for p in prompts]

    def tokens_per_s(loras=None):  # the second of two runs: the adapters loaded, vLLM warm
        for _ in range(2):
            t0 = time.time()
            llm.generate(reqs, sp, use_tqdm=False, lora_request=loras)
        return len(prompts) * max_new / (time.time() - t0)
    out = dict(max_loras=max_loras, base=tokens_per_s())
    for K, folders in loras.items():
        ks = rows_of(K, len(prompts))
        out[f"mixed_{K}"] = tokens_per_s([LoRARequest(f"K{K}a{k}", K * 10 ** 5 + k, folders[k])
                                          for k in ks])
        print(f"vLLM, K = {K}: {out}", flush=True)
    engine.shutdown(llm)
    return out


# a rank-2 LoRA on Qwen2.5-7B: r (in + out) per module, q k v o gate up down, 28 layers
LORA_7B = 2 * 28 * (7168 + 4096 + 4096 + 7168 + 3 * 22528)


def benchmark(spec, Ks=(1, 16, 256, 4096), n=64, max_new=16, max_loras=64):
    """Every comparison on the same n requests (arith prompts, greedy, max_new tokens each): the
    table, and the numbers as a dict."""
    import tempfile
    model, tok = models.load_model(spec)
    rows = task.load_task("arith", "test", 1)
    prompts = [p for _, p in task.prompt_ids(tok, rows[0][:n], rows[1], 512)]
    ours, bank = bench_ours(model, tok, prompts, Ks, max_new)
    res = dict(model=spec, n=n, max_new=max_new, ours=ours)
    with tempfile.TemporaryDirectory() as work:  # each K's adapters the requests name, as LoRAs
        loras = {K: lora_folders(bank, random_vs(K, bank.v.shape), dict.fromkeys(rows_of(K, n)),
                                 os.path.join(work, f"K{K}")) for K in Ks}
        res["peft"] = bench_peft(model, tok, prompts, loras, max_new)
        try:
            res["vllm"] = bench_vllm(model, tok, spec, prompts, loras, bank.config["r"], max_new,
                                     work, max_loras)
        except ImportError:
            res["vllm"] = None
    print_table(res, Ks)
    return res


def print_table(res, Ks):
    ours, peft, vllm = res["ours"], res["peft"], res["vllm"] or {}
    cell = lambda d, k, base: f"{d[k]:.0f} ({d[k] / base:.2f}×)" if k in d else "-"  # noqa: E731
    print(f"{res['n']} requests × {res['max_new']} new tokens, greedy; new tokens/s (÷ the base)")
    print("| adapters held, K | TinyLoRA mixed batch | one adapter after another | PEFT LoRA mixed "
          f"batch | vLLM multi-LoRA ({vllm.get('max_loras', '-')} slots) |\n| --- | --- | --- | "
          "--- | --- |")
    print(f"| base model | {ours['base']:.0f} | | | {vllm['base']:.0f} |" if vllm else
          f"| base model | {ours['base']:.0f} | | | - |")
    for K in Ks:
        print(f"| {K:,} | {cell(ours, f'mixed_{K}', ours['base'])} | "
              f"{cell(ours, f'sequential_{K}', ours['base'])} | "
              f"{cell(peft, f'mixed_{K}', ours['base'])} | "
              f"{cell(vllm, f'mixed_{K}', vllm.get('base', 1))} |")
    print(f"bytes per adapter held: TinyLoRA {ours['bytes_per_adapter']}, its rank-2 LoRA in PEFT "
          f"{peft['bytes_per_adapter']:,}; Qwen2.5-7B (computed): TinyLoRA 13 × 4 = 52, a rank-2 "
          f"LoRA {LORA_7B:,} numbers = {LORA_7B * 2 / 2 ** 20:.1f} MiB in bf16")


if __name__ == "__main__":
    config.run_cli(main)
