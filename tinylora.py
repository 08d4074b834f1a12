"""
TinyLoRA (Morris et al., "Learning to Reason in 13 Parameters", arXiv 2602.04118, §4): each adapted
linear W (out×in) gets its frozen rank-r SVD W ≈ U Σ Vᵀ, fixed random P₁…P_u (r×r) and a tiny
trainable v ∈ ℝᵘ shared by a group of modules:  R = Σᵢ vᵢPᵢ,  ΔW = U Σ R Vᵀ,  y = xWᵀ + (xV)(UΣR)ᵀ.

    bank = apply_tinylora(model, params=13)   # one file to copy; CLI: python -m harness.export

Choices made where the paper is silent (measured: docs/design.md):
 1. ΔW = U Σ R Vᵀ in forward and merge alike (the author's fork forwards with Rᵀ but merges with R;
    PEFT uses U √Σ R √Σ Vᵀ). No extra α: with Adam the learning rate alone sets how fast R moves.
 2. P ~ N(0, 1)/√u from a CPU generator seeded by sha256(seed, module name): the same everywhere.
 3. v is fp32 and zero-initialised: step 0 is bit-identical to the base; the gradient flows via P.
 4. SVD in fp32, canonical signs (R is not sign-invariant); randomized (q = r + 32, 20 power
    iterations: these spectra are flat, and common settings miss σ by up to 6%), its sketch from a
    CPU generator, so a GPU and a laptop build the same U, V (checked on load).
 5. params=N: the author's tiles (u = 1, the least n_tie with ⌈modules/n_tie⌉ = N; then u = 2…r²),
    else balanced groups; or u and n_tie directly; "structured" ties one module type per group.
 6. Merged weights W0 + ΔW are computed in fp32 from the untouched W0 and cast once, never in place.
 7. The adapter file is v + JSON metadata (safetensors); the base's fingerprint refuses another.
"""
import hashlib
import itertools
import json
import math
import os
import re

import torch
import torch.nn as nn

FORMAT_VERSION = 1
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ORIENTATION = "dW = U diag(S) R V^T, R = sum_i v_i P_i"
OVERSAMPLE, NITER = 32, 20  # the randomized SVD's extra sketch columns and power iterations
SIGMA_RTOL = 2e-3  # fingerprint: bf16 vs fp32 weights and the SVD method move σ₁ by < 1e-4
FACTOR_ATOL = 2e-3  # factor probes: fp32 round-off moves them ~1e-5; a 1e-2 change of U or V, ~1e-2


# ---- Math: small pure functions named after the paper's symbols --------------------------------
def canonical_signs(U, V):
    """Flip each pair (uᵢ, vᵢ) so that Σⱼ uᵢⱼ³ > 0 (smooth, unlike "largest entry > 0")."""
    sign = torch.where((U.double() ** 3).sum(dim=0) >= 0, 1.0, -1.0).to(U.dtype)  # (r,)
    return U * sign, V * sign


def svd_factors(W, r, method="randomized", seed=0, oversample=OVERSAMPLE, niter=NITER):
    """Rank-r SVD of W (out, in) in fp32 -> U (out, r), S (r,), V (in, r), canonical signs.
    randomized: a sketch of q = r + oversample columns refined by niter power iterations."""
    W = W.detach().float()
    if r > min(W.shape):
        raise ValueError(f"rank r={r} exceeds min(W.shape)={min(W.shape)}")
    if method == "exact":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        V = Vh.T
    elif method == "randomized":
        q = min(r + oversample, min(W.shape))
        U, S, V = randomized_svd(W, sketch(W.shape[1], q, seed).to(W.device), niter)
    else:
        raise ValueError(f"unknown SVD method {method!r} (use 'exact' or 'randomized')")
    U, V = canonical_signs(U[:, :r], V[:, :r])
    return U.contiguous(), S[:r].contiguous(), V.contiguous()


def sketch(n, q, seed):
    """Ω (n, q) ~ N(0, 1) from a CPU generator, the same on every device (torch.svd_lowrank draws on
    the device: a GPU and a CPU rebuild then differ by ~1e-2)."""
    return torch.randn(n, q, generator=torch.Generator().manual_seed(seed))


def randomized_svd(W, omega, niter):
    """Subspace iteration (Halko et al. 2011, Alg. 4.4; as torch.svd_lowrank) from a sketch Ω
    (in, q): Q spans W Ω, refined niter times through WᵀQ; then the SVD of QᵀW -> U, S, V (q)."""
    Q = torch.linalg.qr(W @ omega).Q  # (out, q)
    for _ in range(niter):
        Q = torch.linalg.qr(W @ torch.linalg.qr(W.T @ Q).Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)  # (q, q), (q,), (q, in)
    return Q @ Ub, S, Vh.T


def stable_seed(seed, name):
    """A 63-bit seed from (seed, module name), the same in every process and on every machine."""
    digest = hashlib.sha256(f"tinylora/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def P_random(u, r, seed, name):
    """Fixed random projections P (u, r, r): N(0, 1)/√u, a CPU generator keyed by (seed, name)."""
    g = torch.Generator(device="cpu").manual_seed(stable_seed(seed, name))
    return torch.randn(u, r, r, generator=g, dtype=torch.float32) / math.sqrt(u)


def P_standard(r):
    """The standard basis of r×r matrices (r², r, r): with it R = v.reshape(r, r), i.e. LoRA-XS."""
    return torch.eye(r * r, dtype=torch.float32).reshape(r * r, r, r)


def R(v, P):
    """R = Σᵢ vᵢ Pᵢ. v (u,), P (u, r, r) -> (r, r)."""
    return torch.einsum("i,ijk->jk", v, P)


def delta_W(U, S, Rm, V):
    """ΔW = U Σ R Vᵀ (out, in), Rm = R(v, P); only merges and exports form it, never training."""
    return (U * S) @ Rm @ V.T


# ---- Budgets and weight tying ------------------------------------------------------------------
def balanced_sizes(n, g):
    """Split n items into g contiguous groups whose sizes differ by at most one (larger first)."""
    return [n // g + (1 if i < n % g else 0) for i in range(g)]


def tile_sizes(n, n_tie):
    """The author's tying: consecutive tiles of n_tie items, the last one shorter."""
    return [min(n_tie, n - i) for i in range(0, n, n_tie)]


def tile_width(n, g):
    """The least n_tie cutting n items into exactly g tiles, or None (the only candidate: ⌈n/g⌉)."""
    w = -(-n // g)
    return w if -(-n // w) == g else None


def budget_sizes(n, r, params, balanced=False):
    """(u, group sizes) for exactly `params` scalars over n modules, u ≤ r². The author's tiles when
    they exist: u = 1 and the smallest n_tie with ⌈n/n_tie⌉ = params, then u = 2 … r² (13 on the
    7B's 196 modules: tiles of 16, the last 4); else (or if balanced) balanced groups, least u."""
    if params <= 0:
        raise ValueError(f"params must be positive, got {params}")
    us = [u for u in range(1, r * r + 1) if params % u == 0 and params // u <= n]
    if not us:
        ok = sorted({u * g for u in range(1, r * r + 1) for g in range(1, n + 1)})
        near = [b for b in ok if b < params][-2:] + [b for b in ok if b > params][:2]
        raise ValueError(f"no exact plan for params={params} on {n} modules with r={r} "
                         f"(max {n * r * r}); nearest feasible budgets: {near}")
    for u in [] if balanced else us:
        if w := tile_width(n, params // u):
            return u, tile_sizes(n, w)
    return us[0], balanced_sizes(n, params // us[0])


def plan_groups(names, types, r, params=None, u=None, n_tie=None, tie="tiled", balanced=False):
    """(u, groups: lists of module names given in layer order). Either params (the exact total, see
    budget_sizes) or u and n_tie (tiles of n_tie modules, the last shorter; any u ≥ 1, though one
    module's R has only r² degrees of freedom, so u > r² pays only when v is shared). tiled: one
    sequence in layer order; structured: one per module type, the budget split over types."""
    if tie not in ("tiled", "structured"):
        raise ValueError(f"unknown tying {tie!r} (use 'tiled' or 'structured')")
    if (params is None) == (u is None and n_tie is None):
        raise ValueError("give either params, or u and n_tie")
    seqs = [list(names)] if tie == "tiled" else [[n for n, t in zip(names, types) if t == ty]
                                                 for ty in dict.fromkeys(types)]
    if params is None:
        u, n_tie = (1 if u is None else u), (1 if n_tie is None else n_tie)
        if u < 1 or n_tie < 1:
            raise ValueError(f"need u >= 1 and n_tie >= 1, got u={u}, n_tie={n_tie}")
        sizes = [tile_sizes(len(s), n_tie) for s in seqs]
    elif tie == "tiled":
        u, sz = budget_sizes(len(names), r, params, balanced)
        sizes = [sz]
    else:
        u = budget_sizes(len(names), r, params, balanced=True)[0]
        per_seq = balanced_sizes(params // u, len(seqs))  # a 0 when groups are fewer than types
        if min(per_seq) == 0 or any(g > len(s) for g, s in zip(per_seq, seqs)):
            raise ValueError(f"structured tying needs from one group per module type to one per "
                             f"module; params={params} gives {params // u} groups")
        sizes = [balanced_sizes(len(s), g) for s, g in zip(seqs, per_seq)]
    ends = [itertools.accumulate(sz) for sz in sizes]
    return u, [s[e - k:e] for s, sz, es in zip(seqs, sizes, ends) for k, e in zip(sz, es)]


def make_plan(names, types, r, params=None, u=None, n_tie=None, tie="tiled", lora_xs=False,
              balanced=False):
    """plan_groups, plus LoRA-XS: u = r² fixed, so params counts groups·r² (n_tie defaults to 1)."""
    if not lora_xs:
        return plan_groups(names, types, r, params, u, n_tie, tie, balanced)
    k = r * r
    if u not in (None, k) or params is not None and (params % k or params // k > len(names)):
        raise ValueError(f"LoRA-XS fixes u = r² = {k}: params must be a multiple of it, at most "
                         f"{len(names) * k} here (got params={params}, u={u})")
    plan = dict(params=params // k) if params is not None else dict(u=1, n_tie=n_tie or 1)
    return k, plan_groups(names, types, 1, tie=tie, balanced=balanced, **plan)[1]  # groups of u = 1


def find_targets(model, targets=DEFAULT_TARGETS):
    """(name, module, type) of every nn.Linear whose last name part is a target, in module order;
    type = the name without its layer index (e.g. 'self_attn.q_proj'), for structured tying."""
    found = [(name, mod, re.sub(r"^.*?\.\d+\.", "", name)) for name, mod in model.named_modules()
             if name.rsplit(".", 1)[-1] in targets and isinstance(mod, nn.Linear)]
    missing = [t for t in targets if t not in {n.rsplit(".", 1)[-1] for n, _, _ in found}]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, nn.Linear)})
        raise ValueError(f"target module(s) {missing} not found among the linear layers {linear}")
    return found


# ---- The layer and the bank of shared v --------------------------------------------------------
class TinyLoRALinear(nn.Module):
    """base(x) + (x V)(U Σ R)ᵀ. The base nn.Linear is untouched; U, S, V, P are frozen buffers left
    out of state_dict (rebuilt from W); v is read from the shared bank (registered there, once)."""

    def __init__(self, base, U, S, V, P, bank, group):
        super().__init__()
        self.base, self.group = base, group
        self.register_buffer("U", U, persistent=False)  # (out, r)
        self.register_buffer("S", S, persistent=False)  # (r,)
        self.register_buffer("V", V, persistent=False)  # (in, r)
        self.register_buffer("P", P, persistent=False)  # (u, r, r)
        object.__setattr__(self, "bank", bank)

    def R(self):
        return R(self.bank.v[self.group], self.P)  # (r, r), fp32

    def forward(self, x):  # x (..., in)
        B = ((self.U * self.S) @ self.R()).to(x.dtype)  # (out, r) = U Σ R, computed in fp32
        return self.base(x) + (x @ self.V.to(x.dtype)) @ B.T  # x Wᵀ + b + (x V)(U Σ R)ᵀ, (..., out)


class Bank(nn.Module):
    """The model's whole trainable state v (n_groups, u), one row per tying group, with the plan
    (groups, config) and the adapted layers that read it."""

    def __init__(self, groups, u, config):
        super().__init__()
        self.v = nn.Parameter(torch.zeros(len(groups), u, dtype=torch.float32))
        self.groups, self.config = groups, config
        self.layers = {}  # module name -> TinyLoRALinear, in layer order

    def num_params(self):
        return self.v.numel()

    @torch.no_grad()
    def delta(self, name):
        """ΔW of one adapted module, fp32 (out, in)."""
        L = self.layers[name]
        return delta_W(L.U, L.S, L.R(), L.V)

    @torch.no_grad()
    def lora_AB(self, name):
        """ΔW of one module as an exact rank-r LoRA, ΔW = B A: A = Vᵀ (r, in), B = U Σ R (out, r)"""
        L = self.layers[name]
        return L.V.T.contiguous(), ((L.U * L.S) @ L.R()).contiguous()

    @torch.no_grad()
    def merged(self, name, dtype=None):
        """W0 + ΔW of one module: fp32 math from the pristine W0, cast once (default: W0's)."""
        W0 = self.layers[name].base.weight
        return (W0.float() + self.delta(name)).to(dtype or W0.dtype)


def apply_tinylora(model, params=None, u=None, n_tie=None, r=2, tie="tiled",
                   targets=DEFAULT_TARGETS, seed=0, svd="randomized", lora_xs=False,
                   balanced=False):
    """Freeze `model`, wrap its target linears in TinyLoRALinear, return the bank of v (zeros).
    lora_xs: u = r² and P = the standard basis (LoRA-XS, tied like TinyLoRA). seed: of P and the SVD
    sketch (the run's --proj-seed). balanced: a params budget in balanced groups, never tiles."""
    if any(isinstance(m, TinyLoRALinear) for m in model.modules()):
        raise ValueError("model already carries TinyLoRA layers")
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    found = find_targets(model, tuple(targets))
    u, groups = make_plan([f[0] for f in found], [f[2] for f in found], r, params, u, n_tie, tie,
                          lora_xs, balanced)
    P_how = "standard basis" if lora_xs else "N(0,1)/sqrt(u), CPU generator, sha256(seed, name)"
    config = dict(format_version=FORMAT_VERSION, r=r, u=u, tie=tie, n_tie=n_tie,
                  params=len(groups) * u, group_sizes=[len(g) for g in groups],
                  targets=list(targets), seed=seed, svd=svd, lora_xs=lora_xs,
                  orientation=ORIENTATION, P=P_how)
    model.requires_grad_(False)
    bank = Bank(groups, u, config).to(next(model.parameters()).device)
    gmap = {name: g for g, names in enumerate(groups) for name in names}
    for name, mod, _ in found:
        U, S, V = svd_factors(mod.weight, r, svd, seed)
        P = P_standard(r) if lora_xs else P_random(u, r, seed, name)
        layer = TinyLoRALinear(mod, U, S, V, P.to(mod.weight.device), bank, gmap[name])
        bank.layers[name] = replace_module(model, name, layer)
    bank.config["fingerprint"] = fingerprint(bank)
    return bank


def replace_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    return module


def remove_tinylora(model):
    """Put the original nn.Linear modules back (their weights were never changed)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, TinyLoRALinear):
            replace_module(model, name, mod.base)
    return model


# ---- The adapter file: v (fp32 or bf16) + JSON metadata in the safetensors header, never pickled
def fingerprint(bank):
    """Identifies the base and its factors: names, shapes, σ₁ and fixed random probes √m·gᵀuᵢ,
    √n·hᵀvᵢ of every module (O(1) values that move as U, V do; fp32 round-off does not)."""
    names = list(bank.layers)
    shapes = [list(bank.layers[n].base.weight.shape) for n in names]
    arch = hashlib.sha256(json.dumps([names, shapes]).encode()).hexdigest()[:16]
    probes = []
    for n in names:
        L, gen = bank.layers[n], torch.Generator().manual_seed(stable_seed(0, n + "/probe"))
        g, h = (nn.functional.normalize(torch.randn(k, generator=gen), dim=0)
                for k in (L.U.shape[0], L.V.shape[0]))
        p = [g @ L.U.float().cpu() * g.numel() ** 0.5, h @ L.V.float().cpu() * h.numel() ** 0.5]
        probes.append([float(f"{x:.6g}") for x in torch.cat(p).tolist()])
    sigma1 = [float(f"{bank.layers[n].S[0].item():.6g}") for n in names]
    return dict(arch=arch, sigma1=sigma1, factors=probes)


def save_safetensors(tensors, path, key=None, meta=None):
    """tensors (+ JSON metadata under `key`) to a temp file, then renamed: never half a file."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={key: json.dumps(meta)} if key else None)
    os.replace(tmp, path)
    return path


def read_safetensors(path, key, what):
    """(tensors, metadata[key]) from a file save_safetensors wrote; one ValueError per defect."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise ValueError(f"{what} file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})[key])
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own types for truncation/corruption
        why = f"{type(e).__name__}: {e}"
        raise ValueError(f"{path} is not a readable TinyLoRA {what} ({why})") from None


def save_adapter(bank, path, dtype=torch.float32, base_model=None):
    """Write v and everything needed to rebuild the adapter (atomically)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"adapter dtype must be float32 or bfloat16, got {dtype}")
    meta = dict(bank.config, base_model=base_model or bank.config.get("base_model"),
                v_dtype=str(dtype).replace("torch.", ""))
    v = bank.v.detach().to("cpu", dtype).contiguous()
    return save_safetensors({"v": v}, path, "tinylora", meta)


def read_adapter(path):
    """(v fp32 (n_groups, u), metadata dict) from an adapter file; a clear ValueError otherwise."""
    tensors, meta = read_safetensors(path, "tinylora", "adapter")
    if "v" not in tensors or not isinstance(meta, dict):
        raise ValueError(f"{path} is not a readable TinyLoRA adapter (no v)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: adapter format version {meta.get('format_version')} is not "
                         f"supported (this tinylora.py reads version {FORMAT_VERSION})")
    if meta.get("orientation") != ORIENTATION:
        raise ValueError(f"{path}: adapter orientation {meta.get('orientation')!r} is not "
                         f"{ORIENTATION!r}")
    return tensors["v"].float(), meta


def check_fingerprint(expected, got, path=""):
    if expected["arch"] != got["arch"]:
        raise ValueError(f"{path}: adapter was made for another architecture or target list "
                         f"(fingerprint {expected['arch']} != this model's {got['arch']})")
    a, b = torch.tensor(expected["sigma1"]), torch.tensor(got["sigma1"])
    rel = ((a - b).abs() / a.abs().clamp_min(1e-12)).max().item()
    if rel > SIGMA_RTOL:
        raise ValueError(f"{path}: adapter was made for different base weights (singular values "
                         f"differ by up to {rel:.2%}, tolerance {SIGMA_RTOL:.1%})")
    if "factors" in expected:  # files written before the factor probes are checked on σ₁ only
        d = (torch.tensor(expected["factors"]) - torch.tensor(got["factors"])).abs().max().item()
        if d > FACTOR_ATOL:
            raise ValueError(f"{path}: adapter was made with different SVD factors U, V (probes "
                             f"differ by {d:.2g}, tolerance {FACTOR_ATOL:g}): another SVD, sketch "
                             "or base")


def load_adapter(model, path):
    """Apply TinyLoRA to `model` as recorded in `path`, check the base's fingerprint, load v."""
    v, c = read_adapter(path)
    if c["n_tie"] is None:  # a file without group_sizes predates the tiles: balanced groups
        plan = dict(params=c["params"], balanced="group_sizes" not in c)
    else:
        plan = dict(u=None if c["lora_xs"] else c["u"], n_tie=c["n_tie"])
    bank = apply_tinylora(model, r=c["r"], tie=c["tie"], targets=c["targets"], seed=c["seed"],
                          svd=c["svd"], lora_xs=c["lora_xs"], **plan)
    try:
        check_fingerprint(c["fingerprint"], bank.config["fingerprint"], path)
        if c.get("group_sizes", bank.config["group_sizes"]) != bank.config["group_sizes"]:
            raise ValueError(f"{path}: its tying groups {c['group_sizes']} are not the ones this "
                             f"tinylora.py plans {bank.config['group_sizes']}")
        if tuple(v.shape) != tuple(bank.v.shape):
            raise ValueError(f"{path}: v has shape {tuple(v.shape)}, the plan needs "
                             f"{tuple(bank.v.shape)}")
    except ValueError:
        remove_tinylora(model)
        raise
    bank.v.data.copy_(v)
    bank.config["base_model"] = c.get("base_model")
    return bank
