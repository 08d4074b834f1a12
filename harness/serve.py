"""
Many TinyLoRA adapters of one base served in one batch: each request names its adapter and a
batch mixes them freely (tinylora.load_adapters: the adapters' v stacked, each row its own R
between projections the whole batch shares).

    python -m harness.serve --model M --adapters a.safetensors b.safetensors \
        --requests requests.jsonl --out replies.jsonl
    python -m harness.serve --engine vllm ...   # the same requests to vLLM's multi-LoRA
    python -m harness.bench --serving MODEL     # the benchmark: harness/bench_serving.py

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
from harness import config, engine, export, models
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
    folders = export.write_loras(bank, bank.vs, range(1, len(bank.vs)), work, args.model)
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


if __name__ == "__main__":
    config.run_cli(main)
