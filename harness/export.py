"""
Exports and the plan: a merged HF folder (W0 + ΔW), the adapter as a standard LoRA folder, the share
of ΔW a merged cast keeps, the plan's one-line description, and the command line for them.

    python -m harness.export plan --model M --params 13             # the plan, no weights read
    python -m harness.export merge --adapter A --out DIR [--dtype bfloat16]   # --model: A's base
    python -m harness.export export-lora --adapter A --out DIR      # PEFT and vLLM read it

Chosen where the paper is silent:
 1. Merged weights are fp32 math from the pristine W0, cast once; the CLI prints how much of ΔW the
    cast keeps (bf16 rounds most of a small ΔW away: export-lora keeps all of it).
 2. The LoRA is exact: lora_A = Vᵀ, lora_B = U Σ R, alpha = r (scale 1), so B A = ΔW.
"""
import contextlib
import json
import os
import sys

import torch

import tinylora
from harness import config
from harness.files import write_atomic
from harness.models import load_model, meta_model


def plan_text(n_modules, targets, r, u, groups, tie, lora_xs=False):
    """One line that says what a plan trains and what it costs ('13 tiles of 16 modules, the last
    4'; 'N groups of a-b modules' when the groups are balanced, not tiles)."""
    sizes, n = [len(g) for g in groups], len(groups) * u
    if all(k == sizes[0] for k in sizes[:-1]) and sizes[-1] <= sizes[0]:
        shape = f"{len(sizes)} tile{'s' * (len(sizes) > 1)} of {sizes[0]} module"
        shape += "s" * (sizes[0] > 1) + (f", the last {sizes[-1]}" if sizes[-1] < sizes[0] else "")
    else:
        shape = f"{len(sizes)} groups of {min(sizes)}-{max(sizes)} modules"
    return (f"{n_modules} modules ({', '.join(targets)}), r={r}, u={u}, {shape}"
            f"{' (structured)' if tie == 'structured' else ''} -> {n} trainable parameters = "
            f"{4 * n} bytes fp32 / {2 * n} bytes bf16{' (LoRA-XS)' if lora_xs else ''}")


def bank_plan(bank):
    c = bank.config
    text = plan_text(len(bank.layers), c["targets"], c["r"], c["u"], bank.groups, c["tie"],
                     c["lora_xs"])
    return f"TinyLoRA plan: {text}"


def write_merged(model, tok, bank, out, dtype):
    """A plain HF model folder whose adapted weights are W0 + ΔW, cast once to dtype. The model is
    consumed: its adapter is removed and its weights replaced."""
    with torch.no_grad():
        for name, layer in bank.layers.items():  # each merge reads its own, still pristine W0
            layer.base.weight.data = bank.merged(name, torch.float32).to(dtype)
    tinylora.remove_tinylora(model).to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_lora(bank, out, base_model=None):
    """ΔW as a standard PEFT LoRA folder (PEFT and vLLM read it); fp32 tensors, written whole."""
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    tensors = {}
    for name in bank.layers:
        A, B = bank.lora(name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.cpu()
    write_atomic(os.path.join(out, "adapter_model.safetensors"),
                 lambda tmp: save_file(tensors, tmp))
    r = bank.config["r"]
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=r,
               base_model_name_or_path=base_model or bank.config.get("base_model"),
               target_modules=list(bank.config["targets"]), lora_dropout=0.0, bias="none",
               fan_in_fan_out=False, use_rslora=False, use_dora=False, inference_mode=True)
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return out


def write_loras(bank, vs, ks, work, base_model=None):
    """{k: folder under work} for adapters ks, rows of vs (K', groups, u), each written as its exact
    rank-r LoRA (PEFT's format, which vLLM reads); bank.v is left as it was."""
    keep, out = bank.v.detach().clone(), {}
    try:
        for k in ks:
            with torch.no_grad():
                bank.v.copy_(vs[k])
            out[k] = write_lora(bank, os.path.join(work, f"lora{k}"), base_model)
    finally:
        with torch.no_grad():
            bank.v.copy_(keep)
    return out


def delta_kept(bank, dtype, every=1):
    """The share of ΔW that merged weights in `dtype` carry, along ΔW, over every `every`-th module:
    ⟨cast(W0 + ΔW) − cast(W0), ΔW⟩ / ‖ΔW‖². On a bf16 checkpoint every entry of ΔW under half a
    rounding step of W0 is lost; 1.0 = all of it arrives."""
    kept = total = 0.0
    for name in list(bank.layers)[::every]:
        W0, dW = bank.layers[name].base.weight.float(), bank.delta(name)
        kept += (((W0 + dW).to(dtype).float() - W0.to(dtype).float()) * dW).sum().item()
        total += dW.square().sum().item()
    return kept / total if total else 1.0


@contextlib.contextmanager
def merged_route(generator, bank, dtype=torch.bfloat16):
    """While the block runs, the generator (rollout.Generator) holds the adapter as the paper
    scored it (the fork's validation on merged weights): W0 + ΔW computed in fp32, cast once to
    `dtype`, in place of W0, with v = 0. Afterwards W0, v and the exact route are back."""
    W0, v = {n: L.base.weight.data for n, L in bank.layers.items()}, bank.v.detach().clone()
    with torch.no_grad():
        for name, L in bank.layers.items():
            L.base.weight.data = bank.merged(name, dtype).to(W0[name].dtype)
        bank.v.zero_()
    lora, generator.lora = generator.lora, None  # a vLLM LoRA slot would add ΔW twice
    generator.push(bank, merged=True)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, L in bank.layers.items():
                L.base.weight.data = W0[name]
        if lora is not None:  # the LoRA route adds ΔW to W0: the engine gets W0 back first
            generator.push(bank, merged=True)
        with torch.no_grad():
            bank.v.copy_(v)
        generator.push(bank)


def plan_main(argv):
    """The plan and its cost, from the model's config alone."""
    ap = config.new_parser("The TinyLoRA plan for a model (no weights read)",
                           prog="python -m harness.export plan")
    config.add_flags(ap, "model", ["model"])
    config.add_flags(ap, "adapter", [k for k in config.FLAGS["adapter"]
                                     if k not in ("svd", "proj_seed")])
    ap.add_argument("--map", action="store_true", help="also print the module -> group map")
    args = ap.parse_args(argv)
    targets = args.targets.split(",")
    found = tinylora.find_targets(meta_model(args.model), tuple(targets))
    u, groups = tinylora.plan_groups([name for name, _ in found], args.r, tie=args.tie,
                                     lora_xs=args.lora_xs, **config.plan_kwargs(args))
    text = plan_text(len(found), targets, args.r, u, groups, args.tie, args.lora_xs)
    print(f"{args.model}: {text}")
    if args.map:
        for g, grp in enumerate(groups):
            print(f"  group {g:3d} ({len(grp)}): {grp[0]} ... {grp[-1]}")


def export_main(cmd, argv):
    """merge | export-lora --model M --adapter A --out DIR."""
    ap = config.new_parser("A merged HF model folder (W0 + ΔW)" if cmd == "merge" else
                           "The adapter as a standard LoRA folder (exact: B A = ΔW)",
                           prog=f"python -m harness.export {cmd}")
    ap.add_argument("--model", default=None, help="the base: hub id, local folder or .gguf file "
                    "(default: the base the adapter records)")
    ap.add_argument("--adapter", required=True, help="a TinyLoRA adapter (.safetensors)")
    ap.add_argument("--out", required=True, help="a new or empty folder")
    if cmd == "merge":
        ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    if not os.path.isfile(args.adapter):
        raise ValueError(f"adapter file not found: {args.adapter}")
    if args.model is None:  # a bad adapter fails here, before the model loads
        args.model = config.adapter_defaults(args.adapter, ())[0].get("model")
        if args.model is None:
            raise ValueError(f"{args.adapter} records no base model: give --model")
        print(f"--model {args.model} (the base {args.adapter} records)")
    tinylora.read_adapter(args.adapter)
    if os.path.isdir(args.out) and os.listdir(args.out) or os.path.isfile(args.out):
        raise ValueError(f"--out {args.out} exists and is not empty: choose a new folder")
    model, tok = load_model(args.model)  # fp32: the factors are those training computed (fp32 SVD)
    bank = tinylora.load_adapter(model, args.adapter)  # refuses an adapter made for another base
    if cmd == "export-lora":
        write_lora(bank, args.out, args.model)
    else:
        dtype = getattr(torch, args.dtype)
        print(f"merged weights in {args.dtype} carry {delta_kept(bank, dtype):.1%} of ΔW "
              f"(the rest is lost to rounding; export-lora keeps all of it)")
        write_merged(model, tok, bank, args.out, dtype)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"{cmd}: wrote {args.out} ({size:,} bytes)")


USAGE = """usage: python -m harness.export {plan,merge,export-lora} ...

  plan         the TinyLoRA plan for a model and its cost, no weights read
  merge        a merged HF model folder: W0 + ΔW, cast once to --dtype
  export-lora  the adapter as a standard LoRA folder (exact: B A = ΔW; PEFT and vLLM read it)

python -m harness.export VERB --help: that verb's flags"""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv else None
    if cmd in ("-h", "--help"):
        print(USAGE)
        return None
    if cmd not in ("plan", "merge", "export-lora"):
        raise ValueError(f"python -m harness.export takes plan, merge or export-lora first, got "
                         f"{cmd!r} (--help: the verbs)")
    return plan_main(argv[1:]) if cmd == "plan" else export_main(cmd, argv[1:])


if __name__ == "__main__":
    config.run_cli(main)
