"""
One definition of the flags the programs share (model, adapter, data, generator, run), each with one
default: the paper's GSM8K recipe. train_grpo.py adds its optimisation flags on top; harness/sft.py
takes train_grpo.py's; eval.py, harness/sweep.py and the plan CLI take the groups they need.
Also: presets, --resume (a run's saved config under the flags given now), and run_cli (a bad input
is one line on stderr and exit code 2, never a traceback).
"""
import argparse
import json
import os
import sys
import textwrap

import tinylora
from harness.models import check_paths

PAPER_MODEL = "Qwen/Qwen2.5-7B-Instruct"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_SMOL = os.path.join(ROOT, "..", "shared", "models", "smollm2-135m-instruct",
                           "SmolLM2-135M-Instruct.Q4_1.gguf")
# cpu-demo: the CPU search's choice (README, "The CPU demo"): 1 shot, 13 parameters, lr 3e-2
PRESETS = {
    "cpu-demo": dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", data="arith", shots=1,
                     batch_prompts=4, group_size=8, max_new_tokens=32, max_prompt=512, steps=16,
                     lr=3e-2, micro_batch=32, mini_batches=1, warmup=0.0, val=100, eval_n=200,
                     dtype="float32", reward="strict", out="runs/cpu-demo"),
}
# cpu-sweep: what docs/results.md's RL-vs-SFT sweep ran (2 shots, 12 steps, micro-batches of 8)
PRESETS["cpu-sweep"] = dict(PRESETS["cpu-demo"], shots=2, steps=12, lr=1e-2, micro_batch=8,
                            out="runs/cpu-sweep")


def summary(config):
    """Every resolved value as wrapped 'name=value' words, for the console (the run's config.json
    keeps the same dict as JSON)."""
    flat = {k: v for k, v in config.items() if k != "resolved"} | config.get("resolved", {})
    words = [f"{k}={v}".replace(" ", "") for k, v in flat.items()]
    return textwrap.fill(" ".join(["config:"] + words), 100, subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)


def new_parser(description):
    """A parser whose usage line names the command as typed (`python -m harness.sft` for a program
    in harness/), with every default in --help."""
    where, name = os.path.split(os.path.splitext(os.path.abspath(sys.argv[0]))[0])
    prog = f"python -m harness.{name}" if os.path.basename(where) == "harness" else None
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_model(ap, runtime=True):
    """--model; with runtime, also the dtype and device it loads in."""
    g = ap.add_argument_group("model")
    g.add_argument("--model", default=PAPER_MODEL, help="hub id, local folder or .gguf file")
    if not runtime:
        return
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="model weights (v is always fp32); auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default="auto")


def add_adapter(ap, factors=True):
    """The plan's flags; with factors, also how U, Σ, V and P are drawn (the SVD, P's seed)."""
    g = ap.add_argument_group("adapter")
    g.add_argument("--params", type=int, default=13, help="exact number of trainable scalars")
    g.add_argument("--u", type=int, default=None, help="scalars per group (with --n-tie)")
    g.add_argument("--n-tie", type=int, default=None, help="modules per tile (the paper's n_tie)")
    g.add_argument("--r", type=int, default=2, help="frozen SVD rank")
    g.add_argument("--tie", default="tiled", choices=["tiled", "structured"])
    g.add_argument("--targets", default=",".join(tinylora.DEFAULT_TARGETS))
    g.add_argument("--lora-xs", action="store_true", help="u = r², P = standard basis")
    if factors:
        g.add_argument("--svd", default="randomized", choices=["randomized", "exact"])
        g.add_argument("--proj-seed", type=int, default=0, help="the fixed random P and SVD sketch")


def add_data(ap):
    g = ap.add_argument_group("data")
    g.add_argument("--data", default="openai/gsm8k",
                   help="openai/gsm8k, a .jsonl file, a folder, 'arith' or 'arith-transfer'")
    g.add_argument("--max-prompt", type=int, default=512)
    g.add_argument("--shots", type=int, default=None,
                   help="solved train problems in the prompt (default: arith 2, else 0)")
    g.add_argument("--val", type=int, default=0, help="last N train problems: validation")


def add_generator(ap):
    g = ap.add_argument_group("generator")
    g.add_argument("--backend", default="auto", choices=["auto", "vllm", "hf"])
    g.add_argument("--max-new-tokens", type=int, default=4096)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                   help="vLLM's share of the card (the rest: the trainer and its activations)")


def add_run(ap):
    g = ap.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="data order and sampling")
    g.add_argument("--dist-timeout", type=float, default=1800,
                   help="under torchrun: seconds a rank waits for the others before failing")


def trainer_args(ap, argv=None):
    """A trainer's flags over the saved config (--resume) or a preset's values; then checked."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.resume:
        cfg_path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"--resume {args.resume}: no config.json there")
        saved = json.load(open(cfg_path))
        ap.set_defaults(**{k: v for k, v in saved.items() if k != "resolved"})  # re-resolved here
    elif args.preset:
        smol = dict(model=SHARED_SMOL) if os.path.isfile(SHARED_SMOL) else {}
        ap.set_defaults(**dict(PRESETS[args.preset], **smol))
    args = ap.parse_args(argv)  # explicit flags still win
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
    import torch
    if args.device == "auto" and args.model == PAPER_MODEL and not torch.cuda.is_available():
        raise ValueError("no GPU here: the default --model, Qwen2.5-7B, would load in fp32 on the "
                         "CPU; give a smaller --model (trainers: --preset cpu-demo), or pass "
                         "--device cpu to insist")


def adapter_plan(args):
    """apply_tinylora's plan arguments from the adapter flags (--u/--n-tie replace --params)."""
    if args.u is None and args.n_tie is None:
        return dict(params=args.params)
    return dict(u=args.u, n_tie=args.n_tie)


def run_cli(main):
    """Run a program's main(): a ValueError (a bad input) is one line on stderr and exit code 2."""
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
