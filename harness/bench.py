"""
Benchmark: this project's TinyLoRA against PEFT's TinyLoraConfig, measured side by side in one run.

    python -m harness.bench --size smollm2 --device cpu               # this machine (2 cores)
    python -m harness.bench --size 7b --device cuda --dtype bfloat16  # a GPU (random weights)
    python -m harness.bench --sync-cost MODEL     # vLLM push: merged weights vs the exact LoRA
    PYTHONPATH=<trl site> python -m harness.bench --grpo-step MODEL  # ours vs TRL + PEFT, a step
    python -m harness.bench --train-pass MODEL    # the training pass alone, shared prompt or not
    python -m harness.bench --merge-gap MODEL     # a bf16 merged push vs the sampler-trainer gap
    python -m harness.bench --serving MODEL [OUT.json]  # K adapters a batch, one regime for all

Builds the model from a config (no download, random weights), then measures, in the same process:
init time (SVD of every adapted module), forward and fwd+bwd step time as ratios to the same
network ("the floor": one trainable scalar on the embeddings, so backward runs through every
layer), peak memory (CUDA only), the time to produce the merged weights W0+ΔW a generator needs
each step (PEFT: merge + unmerge), and tiny-checkpoint save/load time and size. Appends one JSON
line per run to --out.

Chosen here:
 1. 13 parameters, r = 2, all 7 projections for both libraries: ours params=13 (u = 1, the
    author's tiles), PEFT u=13 with all modules tied (weight_tying=1.0), its closest to 13 scalars.
 2. Times are medians of --iters runs after --warmup runs; CUDA is synchronised around each
    timing. All variants run on one model instance; the base forward is timed first and last, and
    the faster counts. On a 2-core CPU, repeated runs of the same ratio vary by about ±5%.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import rollout
import task
import tinylora
from harness import bench_serving, config, export, run, scale
from harness.files import read_jsonl
from harness.data import arith_rows
from harness.models import load_model

SIZES = {  # (architecture, config kwargs): the real shapes, from the published configs
    "tiny": ("qwen2", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=8192)),
    "smollm2": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                              tie_word_embeddings=True)),
    "1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                           num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                           tie_word_embeddings=True)),
    "7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                         tie_word_embeddings=False)),
}


TIMES = ("t_step", "t_gen", "t_train", "t_sync")


def table_cell(res, k, div):
    if k not in res:
        return "-"
    if div:
        return f"{res[k] / div:.2f}×"
    return f"{res[k]:,}" if isinstance(res[k], int) else f"{res[k]:.4g}"


def build(size, device, dtype, seed=0, **override):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    arch, kw = SIZES[size]
    cfg = (Qwen2Config if arch == "qwen2" else LlamaConfig)(max_position_embeddings=4608,
                                                            **dict(kw, **override))
    torch.manual_seed(seed)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return m.eval().requires_grad_(False)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters, warmup):
    """Median seconds of fn() over iters runs after warmup runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def peak_mem(device):
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")


def floor_scalar(model):
    """One trainable scalar multiplying the embeddings: backward then runs through the whole
    network."""
    s = torch.nn.Parameter(torch.ones((), device=model.device, dtype=torch.float32))
    def scale(mod, inp, out):  # noqa: ARG001 (a forward hook's signature)
        return out * s.to(out.dtype)
    hook = model.get_input_embeddings().register_forward_hook(scale)
    return [s], hook


def step_fns(model, params, x):
    def fwd():
        with torch.no_grad():
            model(x)

    def fwd_bwd():
        loss = model(x).logits.float().square().mean()
        loss.backward()
        for p in params:
            p.grad = None
    return fwd, fwd_bwd


def apply_peft(model):
    from peft import TinyLoraConfig, get_peft_model
    cfg = TinyLoraConfig(r=2, u=13, weight_tying=1.0, target_modules=list(tinylora.DEFAULT_TARGETS))
    return get_peft_model(model, cfg)


def get_args(argv=None):
    ap = config.new_parser("TinyLoRA vs PEFT, side by side")
    ap.add_argument("--size", default="smollm2", choices=sorted(SIZES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CUDA, 4 on CPU")
    ap.add_argument("--seq", type=int, default=None, help="default: 512 on CUDA, 256 on CPU")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--svd", default="randomized", choices=["randomized", "exact"])
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--out", default="bench.jsonl")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible")
    return args


def peft_version():
    try:
        import peft
        from peft import TinyLoraConfig  # noqa: F401
        return peft.__version__
    except ImportError:
        return None


def measure_base(model, x, args, res):
    """The base forward and the floor: fwd+bwd with one trainable scalar on the embeddings."""
    fwd, _ = step_fns(model, [], x)
    res["base_fwd_s"] = timed(fwd, args.device, args.iters, args.warmup)
    params, hook = floor_scalar(model)
    _, fwd_bwd = step_fns(model, params, x)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res["floor_step_s"] = timed(fwd_bwd, args.device, args.iters, args.warmup)
    res["floor_mem_gib"] = peak_mem(args.device)
    hook.remove()


def measure_steps(model, params, x, args, res, who):
    fwd, fwd_bwd = step_fns(model, params, x)
    res[f"{who}_fwd_s"] = timed(fwd, args.device, args.iters, args.warmup)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res[f"{who}_step_s"] = timed(fwd_bwd, args.device, args.iters, args.warmup)
    res[f"{who}_mem_gib"] = peak_mem(args.device)


def measure_ours(model, x, args, dtype, res):
    sync(args.device)
    t = time.perf_counter()
    bank = tinylora.apply_tinylora(model, params=13, svd=args.svd)
    sync(args.device)
    res["ours_init_s"] = time.perf_counter() - t
    with torch.no_grad():
        bank.v.normal_(0, 0.01)
    measure_steps(model, [bank.v], x, args, res, "ours")
    res["ours_merged_s"] = timed(lambda: [bank.merged(n, dtype) for n in bank.layers], args.device,
                                 args.iters, 1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "args.safetensors")
        res["ours_save_s"] = timed(lambda: tinylora.save_adapter(bank, path), args.device,
                                   args.iters, 1)
        res["ours_ckpt_bytes"] = os.path.getsize(path)
        tinylora.remove_tinylora(model)
        t = time.perf_counter()
        tinylora.load_adapter(model, path)  # rebuilds every factor: same cost as init
        sync(args.device)
        res["ours_load_s"] = time.perf_counter() - t
    tinylora.remove_tinylora(model)


def measure_peft(model, x, args, res):
    from peft import PeftModel
    sync(args.device)
    t = time.perf_counter()
    pm = apply_peft(model)
    sync(args.device)
    res["peft_init_s"] = time.perf_counter() - t
    trainable = [p for p in pm.parameters() if p.requires_grad]
    res["peft_params"] = sum(p.numel() for p in trainable)
    with torch.no_grad():
        for p in trainable:
            p.normal_(0, 0.01)
    measure_steps(pm, trainable, x, args, res, "peft")

    def merge_unmerge():
        pm.merge_adapter()
        pm.unmerge_adapter()
    res["peft_merged_s"] = timed(merge_unmerge, args.device, args.iters, 1)
    with tempfile.TemporaryDirectory() as d:
        res["peft_save_s"] = timed(lambda: pm.save_pretrained(d), args.device, args.iters, 1)
        res["peft_ckpt_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        base = pm.unload()  # the plain model again
        # the base forward once more, last: the first run of a process is slower
        fwd, _ = step_fns(base, [], x)
        res["base_fwd_s"] = min(res["base_fwd_s"], timed(fwd, args.device, args.iters, args.warmup))
        sync(args.device)
        t = time.perf_counter()
        PeftModel.from_pretrained(base, d)
        sync(args.device)
        res["peft_load_s"] = time.perf_counter() - t


def print_table(res):
    f = res["floor_step_s"]
    rows = [("init (SVD of every module), s", "ours_init_s", "peft_init_s", None),
            ("forward ÷ base forward", "ours_fwd_s", "peft_fwd_s", res["base_fwd_s"]),
            ("fwd+bwd ÷ floor", "ours_step_s", "peft_step_s", f),
            ("peak memory ÷ floor (CUDA only)", "ours_mem_gib", "peft_mem_gib",
             res["floor_mem_gib"]),
            ("merged weights / merge+unmerge, s", "ours_merged_s", "peft_merged_s", None),
            ("checkpoint save, s", "ours_save_s", "peft_save_s", None),
            ("checkpoint load (rebuild), s", "ours_load_s", "peft_load_s", None),
            ("checkpoint size, bytes", "ours_ckpt_bytes", "peft_ckpt_bytes", None)]
    print(f"\n| {res['size']}, {res['machine']} | this project | PEFT "
          f"{res['peft'] or '(not installed)'} |\n| --- | --- | --- |")
    for label, ko, kp, div in rows:
        print(f"| {label} | {table_cell(res, ko, div)} | {table_cell(res, kp, div)} |")
    print(f"(floor fwd+bwd {f * 1e3:.1f} ms, base forward {res['base_fwd_s'] * 1e3:.1f} ms; "
          "trainable: ours 13, "
          f"PEFT {res.get('peft_params', '-')})")


def sync_bench(spec, prompts=8, n=8, max_new=40, reps=3):
    """vLLM push routes side by side on one model: merged weights vs the exact LoRA. Per route: push
    time, rollout time (prompts × n samples, max_new tokens) and the share of ΔW that arrives in
    bf16."""
    model, tok = load_model(spec)
    bank = tinylora.apply_tinylora(model, params=13)
    with torch.no_grad():
        bank.v.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    ids = [p for _, p in task.prompt_ids(tok, arith_rows("test")[:prompts],
                                         task.load_task("arith", "test")[1], 512)]
    res = dict(model=spec, prompts=prompts, n=n, max_new=max_new,
               kept_bf16=export.delta_kept(bank, torch.bfloat16))
    with tempfile.TemporaryDirectory() as d:
        for sync in ("merged", "lora"):
            generator = rollout.make_generator("vllm", model, tok, bank, spec,
                                               os.path.join(d, sync), 1024, 0, sync=sync)
            res[f"{sync}_push_s"] = timed(lambda: generator.push(bank), "cpu", reps, 1)
            res[f"{sync}_rollout_s"] = timed(lambda: generator.generate(ids, n, max_new, 1.0, 0),
                                             "cpu",
                                             reps, 1)
            generator = None  # let the engine go before the next one starts
    print(f"| vLLM push, {prompts}×{n} samples × {max_new} tokens | merged W0+ΔW | exact LoRA | "
          "LoRA ÷ merged |")
    print("| --- | --- | --- | --- |")
    for k in ("push_s", "rollout_s"):
        print(f"| {k[:-2]}, s | {res['merged_' + k]:.3f} | {res['lora_' + k]:.3f} | "
              f"{res['lora_' + k] / res['merged_' + k]:.2f}× |")
    print(f"share of ΔW a bf16 merge would carry at this v: {res['kept_bf16']:.1%} (the LoRA "
          "carries all of it)")
    return res


def merge_gap_bench(spec, prompts=8, n=8, max_new=40):
    """What a bf16 merge does to the rollouts: W0 rounded to the bf16 grid (as a bf16 checkpoint),
    an fp32 vLLM engine, v of magnitude s; per s the share of ΔW a bf16 push carries and the mean
    |log π_trainer − log π_sampler| over sampled tokens after an fp32 push and after a bf16-rounded
    one, next to how far v moved the policy."""
    model, tok = load_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            # on the bf16 grid, kept in fp32: the engine and the trainer agree at v = 0
            p.copy_(p.to(torch.bfloat16))
    bank = tinylora.apply_tinylora(model, params=13)
    ids = [p for _, p in task.prompt_ids(tok, arith_rows("test")[:prompts],
                                         task.load_task("arith", "test")[1], 512)]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        generator = rollout.make_generator("vllm", model, tok, bank, spec, d, 1024, 0)
        for s in (1e-3, 1e-2, 1e-1):
            with torch.no_grad():
                g = torch.Generator().manual_seed(0)
                bank.v.copy_(torch.randn(bank.v.shape, generator=g).sign() * s)
            row = dict(s=s, kept_bf16=export.delta_kept(bank, torch.bfloat16))
            for push in (torch.float32, torch.bfloat16):
                rollout.sync_weights(generator.llm, model, bank, push)
                comps = generator.generate(ids, n, max_new, 1.0, 0)
                seqs = [(ids[i // n], c["ids"]) for i, c in enumerate(comps)]
                lengths = [len(c) for _, c in seqs]
                mask = scale.length_mask(lengths, max(lengths)).bool()
                with torch.no_grad():
                    lp = scale.token_logprobs(model, seqs, 1.0)
                    v = bank.v.clone()
                    bank.v.zero_()
                    lp0 = scale.token_logprobs(model, seqs, 1.0)
                    bank.v.copy_(v)
                gap = (lp - run.sampler_logprobs(comps))[mask].abs().mean().item()
                row[f"gap_{str(push)[6:]}"] = gap
                row["policy_move"] = (lp - lp0)[mask].abs().mean().item()
            rows.append(row)
            print(row)
    print("| |v| | ΔW a bf16 push carries | mean |Δ log π| fp32 push | bf16 push | the policy's "
          "own move |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['s']:g} | {r['kept_bf16']:.1%} | {r['gap_float32']:.2e} | "
              f"{r['gap_bfloat16']:.2e} | {r['policy_move']:.2e} |")
    return rows


def trl_step(spec, steps):
    """TRL 1.16 GRPOTrainer + PEFT 0.21 TinyLoraConfig (13 scalars) on the CPU demo config: per-step
    seconds. The peer baseline of ../shared/anchors/trl_cpu_step.py with this project's loader, task
    and prompt."""
    from datasets import Dataset
    from peft import TinyLoraConfig, get_peft_model
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    model, tok = load_model(spec)
    rows, shots = task.load_task("arith", "train")
    ds = Dataset.from_list([dict(prompt=task.build_prompt(tok, r["question"], shots),
                                 gold=r["gold"]) for r in rows])
    pm = get_peft_model(model, TinyLoraConfig(r=2, u=13, weight_tying=1.0,
                                              target_modules=list(tinylora.DEFAULT_TARGETS)))
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.time() - self.t)

    def strict_reward(completions, gold, **kw):  # noqa: ARG001 (TRL passes every dataset column)
        return [float(task.same_number(task.extract_strict(c), g)) for c,
                g in zip(completions, gold)]

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8,
                      gradient_accumulation_steps=8,
                      num_generations=8, max_completion_length=40, temperature=1.0, top_k=0,
                      top_p=1.0,
                      learning_rate=1e-2, beta=0.0, epsilon=0.2, epsilon_high=0.4,
                      loss_type="dapo", max_steps=steps,
                      logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                      mask_truncated_completions=True, gradient_checkpointing=False, seed=0,
                      dataloader_num_workers=0)
    GRPOTrainer(model=pm, reward_funcs=strict_reward, args=args, train_dataset=ds,
                processing_class=tok,
                callbacks=[Timer()]).train()
    print(json.dumps(dict(step_s=times)))


ANCHOR = os.path.join(config.ROOT, "..", "shared", "anchors", "trl_cpu_step.py")


def run_trl(spec, steps, env):
    """TRL + PEFT's step seconds: the shared anchor script when it is there (it imports
    `engine.load_model`, which this layout calls harness.models.load_model: a one-line `engine`
    module on PYTHONPATH stands in), else this file's --trl-step copy of it."""
    with tempfile.TemporaryDirectory() as shim:
        with open(os.path.join(shim, "engine.py"), "w") as f:
            f.write("from harness.models import load_model  # noqa: F401\n")
        path = os.pathsep.join([shim, config.ROOT, env.get("PYTHONPATH", "")])
        cmd = ([ANCHOR, spec, str(steps)] if os.path.isfile(ANCHOR) else
               ["-m", "harness.bench", "--trl-step", spec, str(steps)])
        p = subprocess.run([sys.executable, *cmd], env=dict(env, PYTHONPATH=path),
                           capture_output=True, text=True, cwd=config.ROOT)
    if p.returncode:
        raise ValueError(f"TRL failed: {p.stderr.strip().splitlines()[-1]}")
    return trl_median(p.stdout.strip().splitlines()[-1])


def trl_median(line):
    """The median step seconds in --trl-step's JSON line or the anchor's summary line ('TRL 1.16.0
    + PEFT TinyLoRA (13 trainable): step times [113.2, 112.9], median ...')."""
    if line.startswith("{"):
        return statistics.median(json.loads(line)["step_s"])
    if "step times [" not in line:
        raise ValueError(f"no step times in TRL's last line: {line[:100]!r}")
    return statistics.median(float(x) for x in line.split("step times [")[1].split("]")[0]
                             .split(","))


def grpo_step_bench(spec, steps=3):
    """The whole GRPO step on the anchor's config (8 prompts × 8 samples, 40 tokens, 2 shots, 13
    parameters), each system in its own process, one after the other: this project with vLLM and
    with HF rollouts, the same without the shared prompt (the in-run baseline), then TRL + PEFT
    (../shared/anchors/trl_cpu_step.py) when TRL is importable."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    res = {}
    runs = [("ours, vLLM", ["--backend", "vllm"]), ("ours, vLLM, prompt recomputed per sample",
                                                    ["--backend", "vllm", "--no-shared-prompt"]),
            ("ours, HF generate", ["--backend", "hf"])]
    config = ["--params", "13", "--batch-prompts", "8", "--max-new-tokens", "40", "--shots", "2",
              "--val", "0",
              "--eval-n", "0", "--sample-every", "0"]
    for label, extra in runs:
        with tempfile.TemporaryDirectory() as d:
            p = subprocess.run([sys.executable, "train_grpo.py", "--preset", "cpu-demo", "--model",
                                spec, "--steps", str(steps), *config, "--out", d, *extra],
                               env=env, capture_output=True, text=True, cwd=config.ROOT)
            if p.returncode:
                raise ValueError(f"{label} failed: {p.stderr.strip().splitlines()[-1]}")
            rows = read_jsonl(os.path.join(d, "log.jsonl"))
            res[label] = {k: statistics.median(r[k] for r in rows) for k in TIMES}
        print(label, res[label], flush=True)
    try:
        import trl  # noqa: F401
        res["TRL 1.16 + PEFT TinyLoRA, HF generate"] = dict(t_step=run_trl(spec, steps, env))
    except ImportError:
        print("TRL is not installed: its column is skipped (pip install --no-deps --target DIR "
              "trl==1.16.0, then PYTHONPATH=DIR)")
    base = res.get("TRL 1.16 + PEFT TinyLoRA, HF generate")
    print(f"\n| GRPO step, anchor config ({steps} steps, median) | step, s | generate | train | "
          "sync | TRL ÷ this |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r in res.items():
        cells = " | ".join(f"{r[k]:.1f}" if k in r else "-" for k in TIMES)
        ratio = f"{base['t_step'] / r['t_step']:.1f}×" if base else "-"
        print(f"| {label} | {cells} | {ratio} |")
    return res


def train_pass_bench(spec, micro_batches=(8, 16, 32)):
    """The training pass alone (forward + backward of the policy log-probs) on the CPU demo's shape:
    8 arith prompts (~150 tokens) × 8 completions of 20 tokens, with the prompt recomputed per
    sample and shared, per micro-batch size; then torch.profiler's top operators of the shared
    pass."""
    model, tok = load_model(spec)
    tinylora.apply_tinylora(model, params=13)
    prompts = [p for _, p in task.prompt_ids(tok, arith_rows("train")[:8],
                                             task.load_task("arith", "test")[1], 512)]
    g = torch.Generator().manual_seed(0)
    seqs = [(p, torch.randint(100, 40000, (20,), generator=g).tolist())
            for p in prompts for _ in range(8)]

    def one_pass(G, mb):
        t_fwd = t_bwd = 0.0
        for s in range(0, len(seqs), mb):
            t = time.perf_counter()
            lp = scale.token_logprobs(model, seqs[s:s + mb], 1.0, G=G)
            t_fwd, t = t_fwd + time.perf_counter() - t, time.perf_counter()
            lp.sum().backward()
            t_bwd += time.perf_counter() - t
        return t_fwd, t_bwd
    print("| training pass, 8 prompts × 8 samples | forward, s | backward, s | total, s |\n| --- | "
          "--- | --- | --- |")
    for G, mb in [(1, micro_batches[0])] + [(8, mb) for mb in micro_batches]:
        one_pass(G, mb)  # warm-up
        f, b = one_pass(G, mb)
        print(f"| {'shared prompt' if G > 1 else 'prompt recomputed'}, micro-batch {mb} | {f:.1f} "
              f"| {b:.1f} | {f + b:.1f} |")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        one_pass(8, micro_batches[0])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8,
                                    max_name_column_width=40))


def main(argv=None):
    modes = {"--train-pass": train_pass_bench, "--sync-cost": sync_bench,
             "--merge-gap": merge_gap_bench,
             "--serving": lambda m, out=None: bench_serving.benchmark(m, out=out),
             "--grpo-step": lambda m, k=3: grpo_step_bench(m, int(k)), "--trl-step": lambda m,
             k: trl_step(m, int(k))}
    # python -m harness.bench --MODE MODEL [STEPS]
    if argv is None and sys.argv[1:2] and sys.argv[1] in modes:
        return modes[sys.argv[1]](*sys.argv[2:4])
    args = get_args(argv)
    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    B, T = args.batch or (8 if cuda else 4), args.seq or (512 if cuda else 256)
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    machine = torch.cuda.get_device_name() if cuda else cpu
    res = dict(size=args.size, device=args.device, machine=machine, torch=torch.__version__,
               peft=peft_version(),
               dtype=str(dtype), batch=B, seq=T, svd=args.svd)
    print(f"machine: {machine} | torch {torch.__version__} | peft {res['peft']} | size {args.size} "
          f"| {dtype} | batch {B}×{T}")
    x = torch.randint(0, SIZES[args.size][1]["vocab_size"], (B, T), device=args.device)
    # one instance for everything: every ratio compares the same weights
    model = build(args.size, args.device, dtype)
    measure_base(model, x, args, res)
    measure_ours(model, x, args, dtype, res)
    if res["peft"] is not None and not args.no_peft:
        measure_peft(model, x, args, res)  # on the same, restored model
    print_table(res)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    config.run_cli(main)
