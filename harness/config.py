"""
The config: every default of a run in one block (FLAGS), grouped by concern, each with its source.
The defaults are the paper's GSM8K recipe (§5.1) and, where the paper is silent, the first author's
verl fork in this parameterisation's units (docs/reproduction.md). A recipe (the paper's other one)
or a preset (a CPU demo) is a named difference over them, which --help and the console print as
such; every resolved value is printed and saved in the run's config.json.

    python train_grpo.py --help            # this block, as flags, with the presets' differences
    python train_grpo.py --preset cpu-demo # the defaults, then the preset's differences, then flags

Chosen where the paper is silent:
 1. Precedence: the defaults < the preset's differences < the flags typed; --resume: the resumed
    run's config.json in place of the defaults and the preset.
 2. A bad value is one line (ValueError) before anything loads; the paper's 7B model on a machine
    without a GPU is refused unless --device cpu insists.
"""
import argparse
import json
import os
import sys
import textwrap

import torch

import task
import tinylora
from harness import data
from harness.models import check_paths

PAPER_MODEL = "Qwen/Qwen2.5-7B-Instruct"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_SMOL = os.path.join(ROOT, "..", "shared", "models", "smollm2-135m-instruct",
                           "SmolLM2-135M-Instruct.Q4_1.gguf")
DTYPES = ["float32", "bfloat16", "float16"]

# ---- Every default of a run: name=(default, "meaning; source"[, choices or type]) --------------
FLAGS = {
    "model": dict(
        model=(PAPER_MODEL, "hub id, local folder or .gguf file (paper §5.1)"),
        dtype=("auto", "weights: auto = bf16 on CUDA, fp32 on the CPU (v: --v-dtype)",
               ["auto", "float32", "bfloat16"]),
        device=("auto", "auto: CUDA when there is a GPU"),
    ),
    "adapter": dict(
        params=(13, "exact trainable scalars (paper: 13 = u 1, tiles of 16 of 196 modules)"),
        u=(None, "scalars per group, with --n-tie (paper §4)", int),
        n_tie=(None, "modules per tile, the paper's n_tie (with --u)", int),
        r=(2, "frozen SVD rank (paper §7: 2)"),
        tie=("tiled", "tiled: neighbours of any type share v (paper §6.5); structured: one type",
             ["tiled", "structured"]),
        targets=(",".join(tinylora.DEFAULT_TARGETS), "q k v o gate up down of every layer (§4)"),
        lora_xs=(False, "u = r², P = the standard basis: LoRA-XS"),
        projections=("fork", "P: the fork's draw (its runs reproduced; tinylora.py's default, "
                     "independent, draws one per module from its name)", ["fork", "independent"]),
        v_dtype=("float32", "v's dtype (paper Fig. 4: fp32 is best per byte)", DTYPES),
        svd=("randomized", "U Σ V: randomized as the fork's svd_lowrank, or exact",
             ["randomized", "exact"]),
        proj_seed=(0, "seeds the SVD sketch and independent P"),
    ),
    "data": dict(
        data=("openai/gsm8k", "hub id, .jsonl, folder, arith or arith-transfer (paper: GSM8K)"),
        max_prompt=(512, "prompt tokens; longer prompts are dropped (fork: 512)"),
        shots=(None, "solved problems before the question (default 0, arith 2)", int),
        val=(0, "the last N training problems form a validation split"),
        prompt=("gsm8k", "gsm8k: the paper's suffix; qwen-boxed: SimpleRL's system and \\boxed{}",
                list(task.PROMPTS)),
    ),
    "rollout": dict(
        backend=("auto", "auto: vLLM when installed, else HF generate", ["auto", "vllm", "hf"]),
        reward=("paper", "paper: verl's GSM8K rule (the paper's); strict: stopped, equal as "
                "numbers; math: verl's MATH rule (the fork's); math-verify", list(task.REWARDS)),
        batch_prompts=(64, "prompts per rollout batch (paper: 64)"),
        group_size=(4, "samples per prompt, G (paper: 4)"),
        max_new_tokens=(4096, "new tokens per sample (paper: 4096)"),
        temperature=(1.0, "sampling temperature (fork: 1.0)"),
        sync=("merged", "vLLM gets merged W0 + ΔW (the fork's), or the exact rank-r LoRA",
              ["merged", "lora"]),
        gpu_memory_utilization=(0.4, "vLLM's share of the card (fork: 0.4)"),
        seed=(0, "data order and sampling"),
    ),
    "loss": dict(
        eps_low=(0.2, "PPO clip below 1 (fork: 0.2)"),
        eps_high=(0.4, "PPO clip above 1 (fork: clip-higher 0.4)"),
        dual_clip=(3.0, "verl's dual-clip c (0: off; fork: 3)"),
        tis_cap=(2.0, "truncated importance sampling cap (fork: 2)"),
        loss_agg=("token-mean", "aggregation (fork: token-mean)",
                  ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]),
        kl_coef=(0.0, "verl's low_var_kl to the base (v = 0), in the loss (paper GSM8K: none)"),
        entropy_coef=(0.0, "entropy bonus on the sampled distribution (fork GSM8K: 0)"),
    ),
    "optimisation": dict(
        epochs=(3, "passes over the training problems (paper: 3)"),
        steps=(None, "rollout steps (default: --epochs)", int),
        mini_batches=(2, "optimizer steps per rollout batch (fork: 64 / 32)"),
        lr=(2e-3, "the fork's 1.25e-4 × 16, its lora_alpha/r (not swept on a GPU)"),
        warmup=(0.05, "share of the steps, linear from lr 0 (verl)"),
        betas=((0.9, 0.999), "AdamW's (verl)"),
        weight_decay=(0.01 / 16, "the fork's 0.01, / 16"),
        grad_clip=(1 / 16, "the fork's 1.0, / 16"),
        shuffle=(False, "a permutation per epoch (fork: the file's order)"),
    ),
    "this run": dict(
        out=("runs/gsm8k", "the run folder"),
        resume=(None, "continue the run in this folder", str),
        eval_n=(0, "held-out problems scored greedily before and after (0: off)"),
        sample_every=(5, "print a sample every k steps (0: never)"),
    ),
    "loss pass and torchrun (the same numbers, in less memory or time)": dict(
        micro_batch=(8, "sequences per forward and backward"),
        micro_tokens=(0, "cap a micro-batch's tokens (0: no cap)"),
        no_shared_prompt=(False, "recompute each prompt for every sample (slower, same result)"),
        plain_logprobs=(False, "train_grpo.token_logprobs: all (b, T, vocab) logits at once"),
        grad_checkpointing=("auto", "recompute each layer in backward; auto: on with CUDA",
                            ["auto", "on", "off"]),
        tensor_parallel=(1, "GPUs per vLLM engine (torchrun)"),
        batch_invariant=(False, "vLLM's batch-invariant kernels (CUDA): no sample sees its batch"),
        dist_timeout=(1800.0, "under torchrun: seconds a rank waits for the others"),
    ),
    "evaluation": dict(
        adapter=(None, "a TinyLoRA adapter (.safetensors)", str),
        compare=(False, "evaluate the base and the adapter in one run"),
        route=("exact", "the adapter exactly, or merged into bf16 weights as the paper scored it",
               ["exact", "merged-bf16", "both"]),
        split=("test", "test, or val (the last --val training problems)"),
        limit=(None, "the first N problems only", int),
        batch_size=(64, "prompts per HF generate call"),
        out=(None, "the JSON report (default: beside the adapter)", str),
        work_dir=(".cache", "where vLLM's copy of a .gguf model goes"),
        suite=(None, "math: Table 2's six benchmarks (--data: a folder of <name>/test.jsonl in "
               "SimpleRL's layout, or hub)", str),
        samples=(1, "replies per problem: 1 greedy; k > 1: avg@k as the fork (T 1, top-p .95)"),
    ),
}
SUITE_DEFAULTS = dict(data="hub", prompt="qwen-boxed", max_prompt=1024, max_new_tokens=16000)
TRAIN_GROUPS = ("model", "adapter", "data", "rollout", "loss", "optimisation", "this run",
                "loss pass and torchrun (the same numbers, in less memory or time)")

# ---- Recipes and presets: named differences over the defaults -----------------------------
RECIPES = {  # the paper's other recipe (§5.1, Table 2): SimpleRL-Zoo's MATH settings, the fork's
    # script math_2gpu_example__no_ray.sh (docs/reproduction.md). Chosen where both are silent: the
    # model Table 2 names (its baselines are SimpleRL's base-model numbers: --model
    # Qwen/Qwen2.5-7B), and the lr of the GSM8K recipe's 13 scalars (the fork's MATH script's 2e-5
    # is LoRA-XS rank 32's); 3 epochs as the paper (the fork's script: 12)
    "math": dict(data=data.SIMPLERL, prompt="qwen-boxed", reward="math", max_prompt=1024,
                 max_new_tokens=3072, batch_prompts=256, group_size=8, mini_batches=1,
                 eps_high=0.2, warmup=0.0, kl_coef=0.001, entropy_coef=0.001, out="runs/math"),
}
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # ../shared's GGUF of it stands in where present
PRESETS = {
    # the CPU demo (docs/results.md, "A demo whose lesson holds on every seed"): SmolLM2, a ± b with
    # one solved example; 52 scalars, because 13 gain significantly on at most two seeds of five on
    # this 135M model; the optimisation its first search chose (before the fork's clip, decay, data
    # order, dual clip and P became the defaults)
    "cpu-demo": dict(model=SMOL, data="arith", shots=1, params=52, batch_prompts=4, group_size=8,
                     max_new_tokens=32, steps=16, lr=1e-2, micro_batch=32, mini_batches=1,
                     warmup=0.0, val=100, eval_n=200, dtype="float32", reward="strict",
                     out="runs/cpu-demo", grad_clip=1.0, weight_decay=0.0, shuffle=True,
                     dual_clip=0.0, projections="independent"),
}
# what docs/results.md's sweeps ran (the budget: their --budgets): 2 shots, 12 steps, micro 8
PRESETS["cpu-sweep"] = dict(PRESETS["cpu-demo"], params=13, shots=2, steps=12, lr=1e-2,
                            micro_batch=8, out="runs/cpu-sweep")
# the MATH recipe end to end on a CPU: generated fractions, KL and entropy on; no learning claim
PRESETS["cpu-math"] = dict(RECIPES["math"], recipe="math", model=SMOL, data="fractions",
                           dtype="float32", batch_prompts=4, group_size=4, max_new_tokens=48,
                           steps=3, micro_batch=16, lr=3e-2, eval_n=20, out="runs/cpu-math")


def defaults(groups=TRAIN_GROUPS):
    """{name: default} of the groups' flags."""
    return {k: spec[0] for g in groups for k, spec in FLAGS[g].items()}


def preset(name):
    """A preset's differences ({} for none), with ../shared's SmolLM2 GGUF for the hub's where it
    is present."""
    diff = dict(PRESETS[name]) if name else {}
    if diff.get("model") == SMOL and os.path.isfile(SHARED_SMOL):
        diff["model"] = SHARED_SMOL
    return diff


# ---- Parsers ------------------------------------------------------------------------------
def new_parser(description, prog=None, epilog=None):
    """A parser whose usage names the command as typed (`python -m harness.sft` for a program in
    harness/), every default in --help."""
    where, name = os.path.split(os.path.splitext(os.path.abspath(sys.argv[0]))[0])
    if prog is None and os.path.basename(where) == "harness":
        prog = f"python -m harness.{name}"
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=HelpFormatter)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, and the epilog (the presets' differences) as written."""


def add_flags(ap, group, names=None, title=None):
    """The flags of FLAGS[group] (or only `names`) as an argument group of ap."""
    g = ap.add_argument_group(title or group)
    for name, (default, meaning, *kind) in FLAGS[group].items():
        if names is not None and name not in names:
            continue
        flag, kind = "--" + name.replace("_", "-"), kind[0] if kind else type(default)
        if default is False:
            g.add_argument(flag, action="store_true", help=meaning)
        elif isinstance(default, tuple):
            g.add_argument(flag, type=type(default[0]), nargs=len(default), default=default,
                           help=meaning)
        elif isinstance(kind, list):
            g.add_argument(flag, default=default, choices=kind, help=meaning)
        else:
            g.add_argument(flag, type=kind, default=default, help=meaning)
    return g


def presets_text():
    """--help's epilog: each recipe and preset as its differences over the defaults."""
    lines = ["recipes and presets (named differences over the defaults above; flags typed win):"]
    for name, diff in {**RECIPES, **PRESETS}.items():
        words = " ".join(f"{k}={v}".replace(" ", "") for k, v in diff.items())
        lines += textwrap.wrap(f"{name}: {words}", 100, initial_indent="  ",
                               subsequent_indent="    ", break_on_hyphens=False)
    return "\n".join(lines)


def trainer_parser(description):
    """The trainers' parser: every group of a run, --preset, the presets in --help."""
    ap = new_parser(description, epilog=presets_text())
    for group in TRAIN_GROUPS:
        add_flags(ap, group)
    ap.add_argument("--recipe", default="gsm8k", choices=["gsm8k", *RECIPES],
                    help="the paper's recipe: GSM8K (the defaults) or MATH (listed below)")
    ap.add_argument("--preset", default=None, choices=list(PRESETS),
                    help="a named difference over the defaults (listed below)")
    return ap


def trainer_args(argv=None, description="GRPO with TinyLoRA"):
    """A trainer's flags over a preset (or over the resumed run's config.json), then checked."""
    ap = trainer_parser(description)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.resume:
        path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"--resume {args.resume}: no config.json there")
        saved = json.load(open(path))
        ap.set_defaults(**{k: v for k, v in saved.items() if k != "resolved"})  # re-resolved
    else:
        ap.set_defaults(**RECIPES.get(args.recipe, {}), **preset(args.preset))
    args = ap.parse_args(argv)  # the flags typed still win
    args.out = args.resume or args.out
    check_trainer_args(args)
    return args


def check_trainer_args(args):
    if args.u is None and args.n_tie is None and args.params <= 0:
        raise ValueError(f"--params must be positive, got {args.params}")
    if (args.u is None) != (args.n_tie is None):
        raise ValueError("--u and --n-tie go together")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; checked before anything starts
    if args.batch_prompts % (args.mini_batches * world):
        raise ValueError(f"--batch-prompts {args.batch_prompts} does not split into --mini-batches "
                         f"{args.mini_batches} × {world} ranks of whole groups")
    if args.tensor_parallel < 1 or world % args.tensor_parallel:
        raise ValueError(f"--tensor-parallel {args.tensor_parallel} must divide the {world} ranks")
    for k in ("batch_prompts", "group_size", "max_new_tokens", "micro_batch", "mini_batches",
              "epochs"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 for sampling, got {args.temperature}")
    check_paths(args.model, args.data)
    check_gpu_recipe(args)


def check_gpu_recipe(args):
    """The paper's 7B model with no GPU would load in fp32 on the CPU: refused unless insisted."""
    if args.device == "auto" and args.model == PAPER_MODEL and not torch.cuda.is_available():
        raise ValueError("no GPU here: the default --model, Qwen2.5-7B, would load in fp32 on the "
                         "CPU; give a smaller --model (trainers: --preset cpu-demo), or pass "
                         "--device cpu to insist")


def eval_args(argv=None, description="Evaluation"):
    """eval.py's flags over what the adapter records (its base) and, beside it, its run's
    config.json (data and generation settings; --suite math: the fork's evaluation instead);
    checked. One console line says what was taken from where."""
    ap = new_parser(description)
    add_flags(ap, "model")
    add_flags(ap, "data")
    add_flags(ap, "rollout", ["backend", "reward", "max_new_tokens", "gpu_memory_utilization",
                              "seed"])
    add_flags(ap, "evaluation")
    add_flags(ap, "loss pass and torchrun (the same numbers, in less memory or time)",
              ["dist_timeout"], title="torchrun")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.suite is not None and args.suite != "math":
        raise ValueError(f"--suite {args.suite!r} is not a suite (known: math)")
    if args.adapter and not os.path.isfile(args.adapter):
        raise ValueError(f"adapter file not found: {args.adapter}")
    found, sources = adapter_defaults(args.adapter, () if args.suite else RUN_KEYS)
    ap.set_defaults(**(SUITE_DEFAULTS if args.suite else {}), **found)
    args = ap.parse_args(argv)  # the flags typed still win
    taken = [f"{src}: " + " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in keys
                                    if getattr(args, k) == found[k])
             for src, keys in sources.items()]
    if any(t.count("--") for t in taken):
        print("defaults " + "; ".join(t for t in taken if t.count("--")))
    if args.suite and args.data != "hub" and not os.path.isdir(args.data):
        raise ValueError(f"--suite math reads --data FOLDER/<benchmark>/test.jsonl (SimpleRL's "
                         f"layout) or --data hub; {args.data!r} is not a folder")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.compare and not args.adapter:
        raise ValueError("--compare needs --adapter")
    check_paths(args.model, args.data)
    check_gpu_recipe(args)
    if args.limit is not None and args.limit < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError("--limit, --max-new-tokens and --batch-size must be >= 1")
    return args


RUN_KEYS = ("data", "shots", "prompt", "max_prompt", "max_new_tokens", "val", "reward", "backend")


def adapter_defaults(adapter, keys=RUN_KEYS):
    """What an adapter file records and its run folder beside it: ({flag: value}, {where: flags}):
    model = the adapter's base (a ../shared GGUF recorded on another machine found again by its
    name), and the run's `keys` from the config.json beside it. ({}, {}) without an adapter."""
    if not adapter:
        return {}, {}
    found, sources = {}, {}
    base = tinylora.read_adapter(adapter)[1].get("base_model")
    if base and not os.path.exists(base) and os.path.basename(base) == os.path.basename(
            SHARED_SMOL) and os.path.isfile(SHARED_SMOL):
        base = SHARED_SMOL
    if base:
        found["model"], sources[f"the base {adapter} records"] = base, ["model"]
    path = os.path.join(os.path.dirname(adapter), "config.json")
    run = json.load(open(path)) if os.path.isfile(path) and keys else {}
    found.update({k: run[k] for k in keys if k in run})
    if run:
        sources[path] = [k for k in keys if k in run]
    return found, sources


# ---- From flags to the library's arguments, and back to the console ----------------------------
def plan_kwargs(args):
    """The tying plan from the adapter flags: --params, or --u with --n-tie."""
    if args.u is None and args.n_tie is None:
        return dict(params=args.params)
    return dict(u=args.u, n_tie=args.n_tie)


def adapter_kwargs(args):
    """apply_tinylora's keyword arguments from the adapter flags."""
    return dict(plan_kwargs(args), r=args.r, tie=args.tie, targets=args.targets.split(","),
                seed=args.proj_seed, svd=args.svd, lora_xs=args.lora_xs,
                projections=args.projections, v_dtype=getattr(torch, args.v_dtype))


def summary(config):
    """Every resolved value as wrapped 'name=value' words (config.json keeps the same dict)."""
    flat = {k: v for k, v in config.items() if k != "resolved"} | config.get("resolved", {})
    words = [f"{k}={v}".replace(" ", "") for k, v in flat.items()]
    return textwrap.fill(" ".join(["config:"] + words), 100, subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)


def resolved(rt):
    return dict(device=rt.device, dtype=str(rt.dtype), backend=rt.backend, world_size=rt.world,
                grad_checkpointing=rt.grad_checkpointing)


def print_config(args, rt):
    """The preset's differences (when one is used), then every resolved value."""
    if rt.rank > 0:
        return
    named = [("recipe", args.recipe, RECIPES.get(args.recipe)), ("preset", args.preset,
                                                                  preset(args.preset))]
    for kind, name, diff in named if not args.resume else []:
        words = " ".join(f"{k}={v}".replace(" ", "") for k, v in (diff or {}).items())
        if words:
            print(textwrap.fill(f"{kind} {name} over the defaults: {words}", 100,
                                subsequent_indent="  ", break_on_hyphens=False))
    print(summary(dict(vars(args), resolved=resolved(rt))))


def run_cli(main):
    """Run a program's main(): a ValueError (a bad input) is one line on stderr and exit code 2."""
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
