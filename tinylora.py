"""
TinyLoRA: train a handful of scalars on top of a frozen LLM.

"Learning to Reason in 13 Parameters" (Morris et al., arXiv 2602.04118, §4). For every adapted linear
layer W (out×in) with frozen truncated SVD W ≈ U Σ Vᵀ (rank r), fixed random P₁…P_u (r×r) and a tiny
trainable v ∈ ℝᵘ,

    R  = Σᵢ vᵢ Pᵢ                      (r, r)
    ΔW = U Σ R Vᵀ                      (out, in)     never formed while training
    y  = x Wᵀ + (x V)(U Σ R)ᵀ          = x (W + ΔW)ᵀ

and one v is shared by n_tie modules ("weight tying"), so a whole model trains G·u scalars.

Print the plan for a model (no weights are read):

    python tinylora.py --model HuggingFaceTB/SmolLM2-135M-Instruct --params 13
    python tinylora.py --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf --u 1 --n-tie 16

Use it from Python:

    model = load_model("Qwen/Qwen2.5-7B-Instruct")
    tl = apply_tinylora(model, params=13)          # freezes the model; tl.v is the only trainable tensor
    opt = torch.optim.AdamW([tl.v], lr=..., weight_decay=0.0)
    ... train ...
    save_adapter(tl, "adapter.safetensors")        # 52-byte tensor payload + JSON metadata
    tl2 = load_adapter(fresh_model, "adapter.safetensors")

Choices made where the paper is silent (and why):
 1. Orientation ΔW = U Σ R Vᵀ (the paper's), used identically by forward and merge. The author's fork
    forwards with Rᵀ but merges with R; PEFT uses U √Σ R √Σ Vᵀ. Learning rates do not transfer between them.
 2. P: entries N(0, 1) divided by √u, drawn on the CPU from a generator seeded with
    sha256(seed, module name) -- device-, process- and target-list-independent (PEFT's per-index seeds
    and v0.19 hash bug gave identical or order-dependent P). The 1/√u is the author's R/√u folded into P,
    so R's scale does not grow with u. No extra α: the update is exactly U Σ R Vᵀ, so |ΔW|/|W| ≈ |R|,
    and with Adam the learning rate alone sets how fast v (hence R) moves.
 3. v is fp32 and zero-initialised (PEFT's choice), so step 0 is bit-identical to the base model; the
    gradient is still non-zero because it flows through P. The author used N(0, 1e-5²): no real difference.
 4. SVD in fp32 whatever the model dtype, with canonical signs (Σⱼ uᵢⱼ³ > 0 for each column of U, V flipped
    with it): R is not sign-invariant, so without this a saved v would rebuild a
    different model on another machine or torch version. Default method "randomized" (torch.svd_lowrank,
    q = r + 32, 20 power iterations), chosen from SmolLM2-135M's 210 matrices: top-2 singular values
    within 1e-5 (relative) of torch.linalg.svd, singular vectors within 9e-3 -- closer than rounding W
    to bf16 moves the exact ones (3.7e-2), because these spectra are flat (median σ₂/σ₃ = 1.04). With
    q = r + 8 and 4 iterations (a common default) σ was off by 6% and vectors by 1.4. A full SVD of a
    3584×18944 matrix costs ~0.9 s on an H100, so "exact" (still available) takes minutes on a 7B model.
 5. Budgets: `params=N` picks the smallest u dividing N with N/u ≤ modules (the paper's rule: u as small
    as possible, then tie), in N/u contiguous groups whose sizes differ by at most one. `u`, `n_tie`
    give the paper's tiles of n_tie consecutive modules (last tile shorter): u=1, n_tie=16 on Qwen2.5-7B's
    196 modules = 13. "structured" tying groups one module type over consecutive layers.
 6. Merged weights W0 + ΔW are computed in fp32 from the untouched W0 and cast once; the base weights are
    never merged in place and un-merged (no drift, no double application).
 7. The checkpoint is v alone (+ JSON metadata inside the safetensors header): everything else is
    rebuilt deterministically from the base model. A fingerprint (every module's σ₁) refuses another base.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys

import torch
import torch.nn as nn

FORMAT_VERSION = 1
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ORIENTATION = "dW = U diag(S) R V^T, R = sum_i v_i P_i"
RANDOMIZED_OVERSAMPLE, RANDOMIZED_NITER = 32, 20

# -----------------------------------------------------------------------------
# Math: small pure functions named after the paper's symbols


def canonical_signs(U, V):
    """Flip each singular pair (uᵢ, vᵢ) so that Σⱼ uᵢⱼ³ > 0. U (m, r), V (n, r).

    A smooth rule: "largest-|.| entry positive" flipped 1-4 of SmolLM2's 210 pairs between the exact and
    the randomized SVD (two entries of near-equal size), the cube sum none."""
    sign = torch.sign((U.double() ** 3).sum(dim=0)).to(U.dtype)  # (r,)
    sign[sign == 0] = 1
    return U * sign, V * sign


def svd_factors(W, r, method="randomized", seed=0):
    """Rank-r truncated SVD of W (out, in) in fp32 -> U (out, r), S (r,), V (in, r), canonical signs."""
    W = W.detach().float()
    if r > min(W.shape):
        raise ValueError(f"rank r={r} exceeds min(W.shape)={min(W.shape)}")
    if method == "exact":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, V = U[:, :r], S[:r], Vh[:r].T
    elif method == "randomized":
        q = min(r + RANDOMIZED_OVERSAMPLE, min(W.shape))
        devices = [W.device] if W.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # svd_lowrank draws from the global RNG
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(W, q=q, niter=RANDOMIZED_NITER)
        U, S, V = U[:, :r], S[:r], V[:, :r]
    else:
        raise ValueError(f"unknown SVD method {method!r} (use 'exact' or 'randomized')")
    U, V = canonical_signs(U, V)
    return U.contiguous(), S.contiguous(), V.contiguous()


def stable_seed(seed, name):
    """A 63-bit seed from (seed, module name) that is the same in every process and on every machine."""
    digest = hashlib.sha256(f"tinylora/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def P_random(u, r, seed, name):
    """Fixed random projections P (u, r, r): N(0, 1)/√u from a CPU generator keyed by (seed, name)."""
    g = torch.Generator(device="cpu").manual_seed(stable_seed(seed, name))
    return torch.randn(u, r, r, generator=g, dtype=torch.float32) / math.sqrt(u)


def P_standard(r):
    """The standard basis of r×r matrices (r², r, r): with it R = v.reshape(r, r), i.e. LoRA-XS."""
    return torch.eye(r * r, dtype=torch.float32).reshape(r * r, r, r)


def R(v, P):
    """R = Σᵢ vᵢ Pᵢ. v (u,), P (u, r, r) -> (r, r)."""
    return torch.einsum("i,ijk->jk", v, P)


def delta_W(U, S, R, V):
    """ΔW = U Σ R Vᵀ (out, in) -- only for merging/export; training never forms it."""
    return (U * S) @ R @ V.T


# -----------------------------------------------------------------------------
# Budgets and weight tying


def balanced_sizes(n, g):
    """Split n items into g contiguous groups whose sizes differ by at most one (larger ones first)."""
    return [n // g + (1 if i < n % g else 0) for i in range(g)]


def feasible_budgets(n_modules, r):
    """Every N that `params=N` accepts: N = u·G with u ≤ r² and G ≤ n_modules."""
    return sorted({u * g for u in range(1, r * r + 1) for g in range(1, n_modules + 1)})


def resolve_u(n_modules, r, params):
    """The paper's rule (§7): the smallest u dividing N with N/u ≤ modules (and u ≤ r²)."""
    if params <= 0:
        raise ValueError(f"params must be positive, got {params}")
    for u in range(1, r * r + 1):
        if params % u == 0 and params // u <= n_modules:
            return u
    ok = feasible_budgets(n_modules, r)
    below = [b for b in ok if b < params][-2:]
    above = [b for b in ok if b > params][:2]
    raise ValueError(f"no exact plan for params={params} on {n_modules} modules with r={r} "
                     f"(max {n_modules * r * r}); nearest feasible budgets: {below + above}")


def plan_groups(names, types, r, params=None, u=None, n_tie=None, tie="tiled"):
    """Assign each module (given in layer order) to a group; return (u, groups: list of name lists).

    tiled      : groups are consecutive modules in layer order (q,k,v,o,gate,up,down, next layer ...).
    structured : each group holds one module type over consecutive layers.
    Give either params (exact total) or u and n_tie (tiles of n_tie modules, the last one shorter).
    """
    n = len(names)
    if n == 0:
        raise ValueError("no modules to adapt")
    if tie not in ("tiled", "structured"):
        raise ValueError(f"unknown tying {tie!r} (use 'tiled' or 'structured')")
    if (params is None) == (u is None and n_tie is None):
        raise ValueError("give either params, or u and n_tie")
    if params is None:
        u, n_tie = (1 if u is None else u), (1 if n_tie is None else n_tie)
        if not 1 <= u <= r * r:
            raise ValueError(f"u must be in [1, r²={r * r}], got {u}")
        if n_tie < 1:
            raise ValueError(f"n_tie must be >= 1, got {n_tie}")
    else:
        u = resolve_u(n, r, params)
    if tie == "tiled":
        seqs = [list(names)]
    else:  # one sequence per module type, in order of first appearance
        order = list(dict.fromkeys(types))
        seqs = [[nm for nm, t in zip(names, types) if t == ty] for ty in order]
    if params is None:
        sizes = [[min(n_tie, len(s) - i) for i in range(0, len(s), n_tie)] for s in seqs]
    else:
        G = params // u
        if G < len(seqs):
            raise ValueError(f"structured tying needs at least one group per module type ({len(seqs)}), "
                             f"params={params} gives {G}; use tie='tiled'")
        per_seq = balanced_sizes(G, len(seqs))
        if any(g > len(s) for g, s in zip(per_seq, seqs)):
            raise ValueError(f"params={params} gives more groups than modules of one type")
        sizes = [balanced_sizes(len(s), g) for s, g in zip(seqs, per_seq)]
    groups = []
    for s, sz in zip(seqs, sizes):
        i = 0
        for k in sz:
            groups.append(s[i:i + k])
            i += k
    return u, groups


def make_plan(names, types, r, params=None, u=None, n_tie=None, tie="tiled", lora_xs=False):
    """plan_groups, plus LoRA-XS: u = r² fixed, so params counts G·r² and n_tie defaults to 1."""
    if not lora_xs:
        return plan_groups(names, types, r, params=params, u=u, n_tie=n_tie, tie=tie)
    if u not in (None, r * r) or (params is not None and params % (r * r)):
        raise ValueError(f"LoRA-XS fixes u = r² = {r * r}; params must be a multiple of it (got params={params}, u={u})")
    if params is not None:  # G = params / r² balanced groups: the u=1 planner on G
        return r * r, plan_groups(names, types, r, params=params // (r * r), tie=tie)[1]
    return r * r, plan_groups(names, types, r, u=1, n_tie=n_tie or 1, tie=tie)[1]


def find_targets(model, targets=DEFAULT_TARGETS):
    """(name, module, type) of every nn.Linear whose last name part is a target, in named_modules order.

    type = the name with the layer index removed (e.g. 'self_attn.q_proj'), used by structured tying."""
    found, seen = [], set()
    for name, mod in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in targets and isinstance(mod, nn.Linear):
            found.append((name, mod, re.sub(r"^.*?\.\d+\.", "", name)))
            seen.add(last)
    missing = [t for t in targets if t not in seen]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target module(s) {missing} not found among this model's linear layers {linear}")
    return found


# -----------------------------------------------------------------------------
# The layer and the bank of shared v


class TinyLoRALinear(nn.Module):
    """base(x) + (x V)(U Σ R)ᵀ. The base nn.Linear is untouched; U, S, V, P are frozen buffers; v is read
    from the shared bank (not registered here, so it is counted and saved once)."""

    def __init__(self, base, U, S, V, P, bank, group):
        super().__init__()
        self.base, self.group = base, group
        # persistent=False: the model's state_dict keeps only real weights; these are rebuilt from W.
        self.register_buffer("U", U, persistent=False)  # (out, r)
        self.register_buffer("S", S, persistent=False)  # (r,)
        self.register_buffer("V", V, persistent=False)  # (in, r)
        self.register_buffer("P", P, persistent=False)  # (u, r, r)
        object.__setattr__(self, "bank", bank)

    def R(self):
        return R(self.bank.v[self.group], self.P)  # (r, r), fp32

    def forward(self, x):  # x (..., in)
        B = (self.U * self.S) @ self.R()  # (out, r) = U Σ R, fp32
        h = x @ self.V.to(x.dtype)  # (..., r)
        y = self.base(x)  # (..., out)
        # y + h Bᵀ as one GEMM with beta=1: no separate (..., out) tensor for the update and no extra add pass
        return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.T.to(x.dtype)).view_as(y)

    def extra_repr(self):
        return f"r={self.S.numel()}, u={self.P.shape[0]}, group={self.group}"


class TinyLoRA(nn.Module):
    """The trainable state of the whole model: v (G, u), one row per tying group. Holds the plan too."""

    def __init__(self, groups, u, config):
        super().__init__()
        self.v = nn.Parameter(torch.zeros(len(groups), u, dtype=torch.float32))
        self.groups, self.config = groups, config
        self.layers = {}  # module name -> TinyLoRALinear, in layer order

    def num_params(self):
        return self.v.numel()

    def group_map(self):
        return {name: g for g, names in enumerate(self.groups) for name in names}

    @torch.no_grad()
    def delta(self, name):
        """ΔW of one adapted module, fp32 (out, in)."""
        L = self.layers[name]
        return delta_W(L.U, L.S, L.R(), L.V)

    @torch.no_grad()
    def merged_weights(self, dtype=None):
        """Yield (param name, W0 + ΔW): fp32 math from the pristine W0, cast once to dtype (default W0's)."""
        for name, L in self.layers.items():
            W0 = L.base.weight
            yield f"{name}.weight", (W0.float() + self.delta(name)).to(dtype or W0.dtype)

    def plan_text(self):
        c, n = self.config, self.num_params()
        sizes = [len(g) for g in self.groups]
        return (f"TinyLoRA plan: {len(self.layers)} modules ({', '.join(c['targets'])}), r={c['r']}, "
                f"u={c['u']}, {len(self.groups)} {c['tie']} groups of {min(sizes)}-{max(sizes)} modules "
                f"-> {n} trainable parameters = {4 * n} bytes fp32 / {2 * n} bytes bf16"
                f"{' (LoRA-XS)' if c['lora_xs'] else ''}")


def apply_tinylora(model, params=None, u=None, n_tie=None, r=2, tie="tiled", targets=DEFAULT_TARGETS,
                   seed=0, svd="randomized", lora_xs=False, verbose=False):
    """Freeze `model`, wrap its target linears in TinyLoRALinear, return the TinyLoRA bank (v = zeros).

    lora_xs=True: u = r², P = standard basis, so R itself is trainable (LoRA-XS, tied like TinyLoRA)."""
    if any(isinstance(m, TinyLoRALinear) for m in model.modules()):
        raise ValueError("model already carries TinyLoRA layers")
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    found = find_targets(model, tuple(targets))
    u, groups = make_plan([f[0] for f in found], [f[2] for f in found], r, params, u, n_tie, tie, lora_xs)
    config = dict(format_version=FORMAT_VERSION, r=r, u=u, tie=tie, n_tie=n_tie, params=len(groups) * u,
                  targets=list(targets), seed=seed, svd=svd, lora_xs=lora_xs, orientation=ORIENTATION,
                  P="standard basis" if lora_xs else "N(0,1)/sqrt(u), CPU generator seeded by sha256(seed, name)")
    model.requires_grad_(False)
    first_param = next(model.parameters())
    bank = TinyLoRA(groups, u, config).to(first_param.device)
    gmap = bank.group_map()
    for name, mod, _ in found:
        U, S, V = svd_factors(mod.weight, r, svd, seed)
        P = P_standard(r) if lora_xs else P_random(u, r, seed, name)
        layer = TinyLoRALinear(mod, U, S, V, P.to(mod.weight.device), bank, gmap[name])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        bank.layers[name] = layer
    bank.config["fingerprint"] = fingerprint(bank)
    if verbose:
        print(bank.plan_text())
    return bank


def remove_tinylora(model):
    """Put the original nn.Linear modules back (their weights were never changed)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, TinyLoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, mod.base)
    return model


def count_trainable(model, *extra):
    """Number of distinct trainable scalars in the model (and any extra modules, e.g. the bank)."""
    params = {id(p): p for m in (model, *extra) for p in m.parameters() if p.requires_grad}
    return sum(p.numel() for p in params.values())


# -----------------------------------------------------------------------------
# Tiny checkpoint: v (fp32 or bf16) + JSON metadata in the safetensors header. Never pickled.


def fingerprint(bank):
    """Identifies the base weights: names, shapes and σ₁ of every adapted module (robust to dtype/SVD)."""
    names = list(bank.layers)
    shapes = [list(bank.layers[n].base.weight.shape) for n in names]
    arch = hashlib.sha256(json.dumps([names, shapes]).encode()).hexdigest()[:16]
    return dict(arch=arch, sigma1=[float(f"{bank.layers[n].S[0].item():.6g}") for n in names])


SIGMA_RTOL = 2e-3  # bf16 vs fp32 weights and randomized vs exact SVD move σ₁ by <1e-4 (see README)


def save_adapter(bank, path, dtype=torch.float32, base_model=None):
    """Write v and everything needed to rebuild the adapter. Atomic: a crash never leaves half a file."""
    from safetensors.torch import save_file
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"adapter dtype must be float32 or bfloat16, got {dtype}")
    meta = dict(bank.config, base_model=base_model or bank.config.get("base_model"),
                v_dtype=str(dtype).replace("torch.", ""))
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({"v": bank.v.detach().to("cpu", dtype).contiguous()}, tmp, metadata={"tinylora": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_adapter(path):
    """(v fp32 (G, u), metadata dict) from an adapter file; a clear ValueError for anything malformed."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise ValueError(f"adapter file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})["tinylora"])
            v = f.get_tensor("v").float()
    except Exception as e:  # safetensors raises its own types for truncation/corruption
        raise ValueError(f"{path} is not a readable TinyLoRA adapter ({type(e).__name__}: {e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: adapter format version {meta.get('format_version')} is not supported "
                         f"(this tinylora.py reads version {FORMAT_VERSION})")
    if meta.get("orientation") != ORIENTATION:
        raise ValueError(f"{path}: adapter orientation {meta.get('orientation')!r} != {ORIENTATION!r}")
    return v, meta


def check_fingerprint(expected, got, path=""):
    if expected["arch"] != got["arch"]:
        raise ValueError(f"{path}: adapter was made for another architecture or target list "
                         f"(fingerprint {expected['arch']} != this model's {got['arch']})")
    a, b = torch.tensor(expected["sigma1"]), torch.tensor(got["sigma1"])
    rel = ((a - b).abs() / a.abs().clamp_min(1e-12)).max().item()
    if rel > SIGMA_RTOL:
        raise ValueError(f"{path}: adapter was made for different base weights "
                         f"(singular values differ by up to {rel:.2%}, tolerance {SIGMA_RTOL:.1%})")


def load_adapter(model, path):
    """Apply TinyLoRA to `model` exactly as recorded in `path`, check the base fingerprint, load v."""
    v, meta = read_adapter(path)
    c = meta
    kw = dict(r=c["r"], tie=c["tie"], targets=c["targets"], seed=c["seed"], svd=c["svd"], lora_xs=c["lora_xs"])
    if c["n_tie"] is not None:
        kw.update(u=None if c["lora_xs"] else c["u"], n_tie=c["n_tie"])
    else:
        kw.update(params=c["params"])
    bank = apply_tinylora(model, **kw)
    try:
        check_fingerprint(c["fingerprint"], bank.config["fingerprint"], path)
        if tuple(v.shape) != tuple(bank.v.shape):
            raise ValueError(f"{path}: v has shape {tuple(v.shape)}, the plan needs {tuple(bank.v.shape)}")
    except ValueError:
        remove_tinylora(model)
        raise
    with torch.no_grad():
        bank.v.copy_(v)
    bank.config["base_model"] = c.get("base_model")
    return bank


# -----------------------------------------------------------------------------
# Loading a model from a hub id, a local folder or a .gguf file


def split_gguf(spec):
    """'dir/x.gguf' -> ('dir', 'x.gguf'); anything else -> (spec, None)."""
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ValueError(f"GGUF file not found: {spec}")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    return spec, None


def load_model(spec, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a hub id, a local folder, or a .gguf file (dequantized by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, gguf = split_gguf(spec)
    kw = dict(gguf_file=gguf) if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device)
    except OSError as e:  # missing folder, unknown hub id, no network: one line, not a traceback
        raise ValueError(f"cannot load model {spec!r}: {str(e).strip().splitlines()[0]}") from None
    if gguf:  # the GGUF quantizer marks the model unserializable; the weights are plain floats now
        model.config.__dict__.pop("quantization_config", None)
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.is_quantized = False
    model.eval()
    return model, tok


def run_cli(main):
    """Run a script's main(): a ValueError (any bad input) becomes one line on stderr and exit code 2."""
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Print the TinyLoRA plan for a model (reads no weights).")
    ap.add_argument("--model", required=True, help="hub id, local folder or .gguf file")
    ap.add_argument("--params", type=int, default=None, help="exact number of trainable scalars")
    ap.add_argument("--u", type=int, default=None, help="scalars per group (with --n-tie)")
    ap.add_argument("--n-tie", type=int, default=None, help="modules per tile (with --u)")
    ap.add_argument("--r", type=int, default=2, help="frozen SVD rank")
    ap.add_argument("--tie", default="tiled", choices=["tiled", "structured"])
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    ap.add_argument("--lora-xs", action="store_true", help="u = r², P = standard basis")
    ap.add_argument("--map", action="store_true", help="also print the module -> group map")
    a = ap.parse_args(argv)
    if a.params is None and a.u is None and a.n_tie is None:
        a.params = 13
    from transformers import AutoConfig, AutoModelForCausalLM
    path, gguf = split_gguf(a.model)
    cfg = AutoConfig.from_pretrained(path, **(dict(gguf_file=gguf) if gguf else {}))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    found = find_targets(model, tuple(a.targets.split(",")))
    u, groups = make_plan([f[0] for f in found], [f[2] for f in found], a.r, a.params, a.u, a.n_tie, a.tie, a.lora_xs)
    names, r = [f[0] for f in found], a.r
    n = len(groups) * u
    sizes = [len(g) for g in groups]
    print(f"{a.model}: {len(names)} modules ({', '.join(a.targets.split(','))}), r={r}, u={u}, "
          f"{len(groups)} {a.tie} groups of {min(sizes)}-{max(sizes)} modules -> {n} trainable parameters "
          f"= {4 * n} bytes fp32 / {2 * n} bytes bf16")
    if a.map:
        for g, grp in enumerate(groups):
            print(f"  group {g:3d} ({len(grp)}): {grp[0]} ... {grp[-1]}")


if __name__ == "__main__":
    run_cli(main)
