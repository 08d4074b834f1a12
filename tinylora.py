"""
TinyLoRA (Morris et al., "Learning to Reason in 13 Parameters", arXiv 2602.04118, §4), one file
(torch, safetensors): copy it. Each adapted linear W (out×in) gets its frozen rank-r SVD
W ≈ U Σ Vᵀ, fixed random P₁…P_u (r×r) and a tiny trainable v ∈ ℝᵘ shared by a group of modules:

    R = Σᵢ vᵢPᵢ     ΔW = U Σ R Vᵀ     y = x Wᵀ + (x V)(U Σ R)ᵀ     bank = apply_tinylora(model)

Sections: math, layer, bank, tying plan, fingerprint, apply/remove, adapter file, and last many
adapters of one base in one batch (bank = load_adapters(model, paths); bank.adapter_of_row = (b,)
indices, 0 the base: row k gets its own R_k between the V and U Σ the batch shares). Where the
paper is silent:
 1. ΔW = U Σ R Vᵀ in forward and merge alike (the author's fork forwards with Rᵀ but merges with R;
    PEFT uses U √Σ R √Σ Vᵀ). No extra α: with Adam the learning rate alone sets how fast R moves.
 2. P ~ N(0, 1)/√u per module, from a CPU generator keyed by sha256(seed, module name); or "fork":
    the author's draw (P_fork), one per min(out, in). v = 0 at first: the base, to the bit.
 3. SVD in fp32, canonical signs (R is not sign-invariant), randomized with q = r + 32 and 20 power
    iterations (flat spectra), its sketch from a CPU generator: a GPU and a laptop get one U, V.
 4. params=N: the author's tiles (u = 1, then 2 … r²; an n_tie giving N tiles, a power of two where
    one does, as in Fig. 1), else even groups; or u and n_tie; "structured": one type per group.
"""
import hashlib
import json
import math
import os
import re

import torch
import torch.nn as nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OVERSAMPLE, NITER = 32, 20  # the randomized SVD's extra sketch columns and power iterations
FORMAT_VERSION = 1  # the adapter file's; a saved v means the same ΔW only under this orientation
ORIENTATION = "dW = U diag(S) R V^T, R = sum_i v_i P_i"
PLAN_KEYS = ("r", "u", "tie", "n_tie", "group_sizes", "targets", "seed", "svd", "lora_xs",
             "projections")  # what a saved v needs to mean the same ΔW (with the fingerprint)
SIGMA_RTOL = 2e-3  # fingerprint: bf16 vs fp32 weights and the SVD method move σ₁ by < 1e-4
FACTOR_ATOL = 2e-3  # factor probes: fp32 round-off moves them ~1e-5; a 1e-2 change of U or V, ~1e-2

# ---- 1. The math: small pure functions named after the paper's symbols --------------------------
def svd_factors(W, r, method="randomized", seed=0, oversample=OVERSAMPLE, niter=NITER):
    """Rank-r SVD of W (out, in) in fp32 -> U (out, r), S (r,), V (in, r), canonical signs. The
    randomized one meets Eckart–Young within 1e-4 (relative), flat spectra included."""
    W = W.detach().float()
    if r > min(W.shape):
        raise ValueError(f"rank r={r} exceeds min(W.shape)={min(W.shape)}")
    if method == "exact":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        V = Vh.T
    elif method == "randomized":  # the sketch Ω (in, q) from a CPU generator: the same everywhere
        q = min(r + oversample, min(W.shape))
        omega = torch.randn(W.shape[1], q, generator=torch.Generator().manual_seed(seed))
        U, S, V = randomized_svd(W, omega.to(W.device), niter)
    else:
        raise ValueError(f"unknown SVD method {method!r} (use 'exact' or 'randomized')")
    U, V = canonical_signs(U[:, :r], V[:, :r])
    return U.contiguous(), S[:r].contiguous(), V.contiguous()

def randomized_svd(W, omega, niter):
    """Subspace iteration (Halko et al. 2011, Alg. 4.4, as torch.svd_lowrank) from a sketch Ω."""
    Q = torch.linalg.qr(W @ omega).Q  # (out, q): an orthonormal basis of W Ω
    for _ in range(niter):  # refined through Wᵀ Q, then the SVD of Qᵀ W gives U, S, V
        Q = torch.linalg.qr(W @ torch.linalg.qr(W.T @ Q).Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)  # (q, q), (q,), (q, in)
    return Q @ Ub, S, Vh.T

def canonical_signs(U, V):
    """Flip each pair (uᵢ, vᵢ) so that Σⱼ uᵢⱼ³ >= 0 (smooth, unlike "largest entry > 0")."""
    sign = torch.where((U.double() ** 3).sum(dim=0) >= 0, 1.0, -1.0).to(U.dtype)  # (r,)
    return U * sign, V * sign

def stable_seed(seed, name):
    """A 63-bit seed from (seed, module name), the same in every process and on every machine."""
    digest = hashlib.sha256(f"tinylora/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

def P_random(u, r, seed, name):
    """Fixed random projections P (u, r, r): N(0, 1)/√u, a CPU generator keyed by (seed, name)."""
    g = torch.Generator(device="cpu").manual_seed(stable_seed(seed, name))
    return torch.randn(u, r, r, generator=g, dtype=torch.float32) / math.sqrt(u)

def P_fork(u, r, n):
    """P as the author's fork draws it (verl-lora c5b65fc2, lora_utils.py:27-28, 256-259): seed 42,
    torch.svd_lowrank's sketch (n, r), n = min(out, in) (torch >= 2.4), v, then P on the CPU."""
    g = torch.Generator().manual_seed(42)
    torch.randn(n, r, generator=g), torch.randn(u, generator=g)  # the SVD's sketch, then v
    return torch.randn(u, r, r, generator=g) / math.sqrt(u)

def R(v, P):
    """R = Σᵢ vᵢ Pᵢ. v (u,) or one per row (b, u); P (u, r, r) -> (r, r) or (b, r, r)."""
    return torch.einsum("...i,ijk->...jk", v, P)

def B(U, S, R):
    """B = U Σ R (out, r): with A = Vᵀ, ΔW = B A is exactly a rank-r LoRA."""
    return (U * S) @ R

# ---- 2. The layer ----------------------------------------------------------------------------
class TinyLoRALinear(nn.Module):
    """base(x) + (x V)(U Σ R)ᵀ; the base untouched, U, S, V, P frozen buffers rebuilt from W."""

    def __init__(self, base, U, S, V, P, bank, group):
        super().__init__()
        self.base, self.group = base, group
        for k, t in dict(U=U, S=S, V=V, P=P).items():  # (out, r), (r,), (in, r), (u, r, r)
            self.register_buffer(k, t, persistent=False)
        object.__setattr__(self, "bank", bank)  # not a submodule: v is a parameter of the bank only

    def forward(self, x):  # x (..., in)
        if self.bank.adapter_of_row is None:  # training, or one adapter: the paper's formula
            v = self.bank.v[self.group].float()  # (u,)
            USR = B(self.U, self.S, R(v, self.P)).to(x.dtype)  # (out, r) = U Σ R, in fp32
            return self.base(x) + (x @ self.V.to(x.dtype)) @ USR.T  # x Wᵀ + b + (x V)(U Σ R)ᵀ
        v = self.bank.vs[self.bank.adapter_of_row, self.group].float()  # (b, u): serving, below
        return self.forward_rows(x, v)

    def forward_rows(self, x, v):  # x (b, ..., in), v (b, u): each row its own R, V and U Σ shared
        z = torch.einsum("b...i,bji->b...j", x @ self.V.to(x.dtype), R(v, self.P).to(x.dtype))
        return self.base(x) + z @ (self.U * self.S).T.to(x.dtype)  # + ((x V) Rᵀ)(U Σ)ᵀ

# ---- 3. The bank: the model's whole trainable state ----------------------------------------
class Bank(nn.Module):
    """v (groups, u), the plan (groups, config), the adapted layers (name -> TinyLoRALinear)."""

    def __init__(self, groups, u, config, v_dtype=torch.float32):
        super().__init__()
        self.v = nn.Parameter(torch.zeros(len(groups), u, dtype=v_dtype))
        self.groups, self.config, self.layers = groups, config, {}
        # serving (§8): K adapters' v after the base's zeros (1 + K, groups, u), each row's (b,)
        self.vs, self.adapter_of_row = None, None

    @torch.no_grad()
    def delta(self, name):
        """ΔW = U Σ R Vᵀ of one adapted module, fp32 (out, in): only merges and exports form it."""
        return self.lora(name)[1] @ self.layers[name].V.T

    @torch.no_grad()
    def lora(self, name):
        """ΔW of one module as an exact rank-r LoRA B A: A = Vᵀ (r, in), B = U Σ R (out, r)."""
        L = self.layers[name]
        return L.V.T.contiguous(), B(L.U, L.S, R(self.v[L.group].float(), L.P)).contiguous()

    @torch.no_grad()
    def merged(self, name, dtype=None):
        """W0 + ΔW of one module: fp32 math from the pristine W0, cast once (default: W0's)."""
        W0 = self.layers[name].base.weight
        return (W0.float() + self.delta(name)).to(dtype or W0.dtype)

# ---- 4. The tying plan: which modules share a v --------------------------------------------
def tile_sizes(n, n_tie):
    """The author's tying: consecutive tiles of n_tie modules, the last one shorter."""
    return [min(n_tie, n - start) for start in range(0, n, n_tie)]

def even_sizes(n, g):
    """n modules in g contiguous groups whose sizes differ by at most one (larger first)."""
    return [n // g + (1 if i < n % g else 0) for i in range(g)]

def budget(n, r, params, balanced=False, lora_xs=False):
    """(u, group sizes) giving exactly `params` scalars over n modules, u ≤ r² (LoRA-XS: = r²): the
    author's tiles if any (196 modules: 13 is tiles of 16, the last 4), else even groups."""
    if params <= 0:
        raise ValueError(f"params must be positive, got {params}")
    allowed = [r * r] if lora_xs else range(1, r * r + 1)
    us = [u for u in allowed if params % u == 0 and params // u <= n]
    if not us:
        ok = sorted({u * g for u in allowed for g in range(1, n + 1)})
        near = [b for b in ok if b < params][-2:] + [b for b in ok if b > params][:2]
        raise ValueError(f"no exact plan for params={params} on {n} modules with r={r}"
                         f"{' (LoRA-XS: u = r²)' * lora_xs}; nearest feasible budgets: {near}")
    for u in us:  # an n_tie that gives params // u tiles: a power of two, else the least
        widths = [w for w in range(1, n + 1) if math.ceil(n / w) * u == params]
        powers = [w for w in widths if math.log2(w).is_integer()]  # as Fig. 1's n_tie
        if widths and not balanced:
            return u, tile_sizes(n, (powers or widths)[0])
    return us[0], even_sizes(n, params // us[0])

def plan_groups(names, r, *, params=None, u=None, n_tie=None, tie="tiled", lora_xs=False,
                balanced=False):
    """(u, groups: lists of module names, in layer order): exactly `params` scalars (see budget), or
    u and n_tie (tiles of n_tie modules; u > r² pays only when v is shared). tiled: one sequence in
    layer order; structured: one per module type, the budget split over the types."""
    if tie not in ("tiled", "structured"):
        raise ValueError(f"unknown tying {tie!r} (use 'tiled' or 'structured')")
    if (params is None) == (u is None and n_tie is None):
        raise ValueError(f"give either params, or u and n_tie; got params={params}, u={u}, "
                         f"n_tie={n_tie}")
    if lora_xs and u not in (None, r * r):
        raise ValueError(f"LoRA-XS fixes u = r² = {r * r}, got u={u}")
    if tie == "tiled":
        seqs = [list(names)]
    else:  # one sequence per module type (its name without the layer index), in layer order
        types = [re.sub(r"^.*?\.\d+\.", "", n) for n in names]
        seqs = [[n for n, t in zip(names, types) if t == kind] for kind in dict.fromkeys(types)]
    if params is None:
        u = (r * r if lora_xs else 1) if u is None else u
        n_tie = 1 if n_tie is None else n_tie
        if u < 1 or n_tie < 1:
            raise ValueError(f"need u >= 1 and n_tie >= 1, got u={u}, n_tie={n_tie}")
        sizes = [tile_sizes(len(s), n_tie) for s in seqs]
    elif tie == "tiled":
        u, tiles = budget(len(names), r, params, balanced, lora_xs)
        sizes = [tiles]
    else:
        u = budget(len(names), r, params, True, lora_xs)[0]
        per_type = even_sizes(params // u, len(seqs))  # a 0 when groups are fewer than types
        if min(per_type) == 0 or any(g > len(s) for g, s in zip(per_type, seqs)):
            raise ValueError(f"structured tying needs from one group per module type to one per "
                             f"module; params={params} gives {params // u} groups")
        sizes = [even_sizes(len(s), g) for s, g in zip(seqs, per_type)]
    groups = []
    for seq, seq_sizes in zip(seqs, sizes):  # cut each sequence into consecutive groups
        rest = iter(seq)
        groups += [[next(rest) for _ in range(k)] for k in seq_sizes]
    return u, groups

# ---- 5. The fingerprint: the base and its factors, so a v is never applied to another W -----
def fingerprint(bank):
    """The base and its factors: names and shapes (hashed), σ₁, and probes √m·gᵀuᵢ, √n·hᵀvᵢ from
    fixed random g, h (O(1) values that move as U, V do, not with fp32 round-off)."""
    shapes, sigma1, probes = [], [], []
    for n, L in bank.layers.items():
        gen = torch.Generator().manual_seed(stable_seed(0, n + "/probe"))
        g = nn.functional.normalize(torch.randn(L.U.shape[0], generator=gen), dim=0)  # (out,)
        h = nn.functional.normalize(torch.randn(L.V.shape[0], generator=gen), dim=0)  # (in,)
        p = [g @ L.U.float().cpu() * g.numel() ** 0.5, h @ L.V.float().cpu() * h.numel() ** 0.5]
        probes.append([float(f"{x:.6g}") for x in torch.cat(p).tolist()])
        shapes.append(list(L.base.weight.shape))
        sigma1.append(float(f"{L.S[0].item():.6g}"))
    arch = hashlib.sha256(json.dumps([list(bank.layers), shapes]).encode()).hexdigest()[:16]
    return dict(arch=arch, sigma1=sigma1, factors=probes)

def check_fingerprint(expected, got, path=""):
    """A ValueError unless the base (architecture, σ₁) and the factors (probes) are the same; a
    file written before the probes is checked on σ₁ only."""
    if expected["arch"] != got["arch"]:
        raise ValueError(f"{path}: adapter was made for another architecture or target list "
                         f"(fingerprint {expected['arch']} != this model's {got['arch']})")
    a, b = torch.tensor(expected["sigma1"]), torch.tensor(got["sigma1"])
    sigma = ((a - b).abs() / a.abs().clamp_min(1e-12)).max().item()
    probes = (torch.tensor(expected.get("factors", got["factors"])) - torch.tensor(got["factors"]))
    if sigma > SIGMA_RTOL or probes.abs().max().item() > FACTOR_ATOL:
        raise ValueError(f"{path}: adapter was made for different base weights or SVD factors "
                         f"(σ₁ differ by up to {sigma:.2%}, tolerance {SIGMA_RTOL:.1%}; factor "
                         f"probes by {probes.abs().max().item():.2g}, tolerance {FACTOR_ATOL:g})")

# ---- 6. Apply and remove ----------------------------------------------------------------------
def find_targets(model, targets=DEFAULT_TARGETS):
    """(name, module) of every nn.Linear whose last name part is a target, in module order."""
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = [(n, m) for n, m in linear if n.split(".")[-1] in targets]
    missing = [t for t in targets if t not in {n.split(".")[-1] for n, _ in found}]
    if missing:
        raise ValueError(f"target module(s) {missing} not found among the linear layers "
                         f"{sorted({n.split('.')[-1] for n, _ in linear})}")
    return found

def apply_tinylora(model, *, params=None, u=None, n_tie=None, r=2, tie="tiled",
                   targets=DEFAULT_TARGETS, seed=0, svd="randomized", lora_xs=False,
                   projections="independent", v_dtype=torch.float32, balanced=False):
    """Freeze `model`, wrap its target linears in TinyLoRALinear, return the bank of v (zeros).
    lora_xs: u = r², P = the standard basis. seed: of P and the SVD sketch (a run's --proj-seed).
    projections: "independent" (the default here: the paper's fixed random matrices, one per
    module from (seed, name), whatever the model's layout) or "fork" (the author's draw, which
    train_grpo.py defaults to so that its runs reproduce the fork's)."""
    if any(isinstance(m, TinyLoRALinear) for m in model.modules()):
        raise ValueError("model already carries TinyLoRA layers")
    if r < 1 or projections not in ("independent", "fork"):
        raise ValueError(f"need r >= 1 and projections independent or fork: {r}, {projections!r}")
    found = find_targets(model, tuple(targets))
    u, groups = plan_groups([name for name, _ in found], r, params=params, u=u, n_tie=n_tie,
                            tie=tie, lora_xs=lora_xs, balanced=balanced)
    config = dict(format_version=FORMAT_VERSION, r=r, u=u, tie=tie, n_tie=n_tie,
                  params=len(groups) * u, group_sizes=[len(g) for g in groups],
                  targets=list(targets), seed=seed, svd=svd, lora_xs=lora_xs,
                  orientation=ORIENTATION, projections=projections)
    model.requires_grad_(False)
    bank = Bank(groups, u, config, v_dtype).to(next(model.parameters()).device)
    group_of = {name: g for g, names in enumerate(groups) for name in names}
    for name, mod in found:
        U, S, V = svd_factors(mod.weight, r, svd, seed)
        if lora_xs:  # P: the standard basis of r×r matrices, so that R = v.reshape(r, r)
            P = torch.eye(r * r).reshape(r * r, r, r)
        else:
            fork = projections == "fork"
            P = P_fork(u, r, min(mod.weight.shape)) if fork else P_random(u, r, seed, name)
        layer = TinyLoRALinear(mod, U, S, V, P.to(mod.weight.device), bank, group_of[name])
        model.set_submodule(name, layer)
        bank.layers[name] = layer
    bank.config["fingerprint"] = fingerprint(bank)
    return bank

def remove_tinylora(model):
    """Put the original nn.Linear modules back (their weights were never changed)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, TinyLoRALinear):
            model.set_submodule(name, mod.base)
    return model

# ---- 7. The adapter file: v + JSON metadata in a safetensors header, never pickled ----------
def save_adapter(bank, path, dtype=None, base_model=None):
    """v (its dtype, or `dtype`: 13 are 52 bytes in fp32) and what rebuilds the adapter, whole."""
    from safetensors.torch import save_file
    dtype = dtype or bank.v.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"adapter dtype must be float32, bfloat16 or float16, got {dtype}")
    meta = dict(bank.config, base_model=base_model or bank.config.get("base_model"),
                v_dtype=str(dtype).replace("torch.", ""))
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({"v": bank.v.detach().to("cpu", dtype).contiguous()}, tmp,
              metadata={"tinylora": json.dumps(meta)})
    os.replace(tmp, path)
    return path

def read_adapter(path):
    """(v (groups, u) as saved, its metadata) from an adapter file; a clear ValueError otherwise."""
    from safetensors import safe_open
    try:  # safetensors raises its own types for truncation and corruption
        with safe_open(path, framework="pt") as f:
            v, meta = f.get_tensor("v"), json.loads(f.metadata()["tinylora"])
    except Exception as e:
        raise ValueError(f"{path} is not a readable TinyLoRA adapter ({type(e).__name__}: {e})")
    got = (meta.get("format_version"), meta.get("orientation")) if isinstance(meta, dict) else meta
    if got != (FORMAT_VERSION, ORIENTATION):
        raise ValueError(f"{path}: adapter format {got} is not the one this tinylora.py reads, "
                         f"{(FORMAT_VERSION, ORIENTATION)}")
    return v, saved_config(meta)

def saved_config(meta):
    """A file's adapter metadata; one written before --projections drew P independently."""
    return dict(meta, projections=meta.get("projections", "independent"))

def load_adapter(model, path):
    """Apply TinyLoRA to `model` as recorded in `path`, check the base's fingerprint, load v."""
    v, cfg = read_adapter(path)
    # a params budget; in even groups if the file predates the tiles (no group_sizes)
    plan = (dict(params=cfg["params"], balanced="group_sizes" not in cfg) if cfg["n_tie"] is None
            else dict(u=cfg["u"], n_tie=cfg["n_tie"]))
    bank = apply_tinylora(model, r=cfg["r"], tie=cfg["tie"], targets=cfg["targets"],
                          seed=cfg["seed"], svd=cfg["svd"], lora_xs=cfg["lora_xs"],
                          v_dtype=v.dtype, projections=cfg["projections"], **plan)
    try:
        check_fingerprint(cfg["fingerprint"], bank.config["fingerprint"], path)
        if cfg.get("group_sizes", bank.config["group_sizes"]) != bank.config["group_sizes"]:
            raise ValueError(f"{path}: its tying groups {cfg['group_sizes']} are not the ones this "
                             f"tinylora.py plans {bank.config['group_sizes']}")
        if v.shape != bank.v.shape:
            raise ValueError(f"{path}: v has shape {tuple(v.shape)}, the plan needs "
                             f"{tuple(bank.v.shape)}")
    except ValueError:
        remove_tinylora(model)
        raise
    bank.v.data.copy_(v)
    bank.config["base_model"] = cfg.get("base_model")
    return bank

# ---- 8. Many adapters of one base in one batch --------------------------------------------
def load_adapters(model, paths):
    """Apply TinyLoRA as the first file records, then hold every file's v, stacked after the base
    (index 0, v = 0) in bank.vs (1 + K, groups, u); bank.adapter_of_row = (b,) indices, then each
    row of a batch is served by its adapter. Every file must share the first's base, plan and P."""
    bank = load_adapter(model, paths[0])
    vs = [torch.zeros_like(bank.v.data, dtype=torch.float32)]
    for path in paths:
        v, cfg = read_adapter(path)
        diff = [k for k in PLAN_KEYS if cfg.get(k) != bank.config.get(k)]
        try:
            check_fingerprint(cfg["fingerprint"], bank.config["fingerprint"], path)
            if diff or v.shape != bank.v.shape:
                raise ValueError(f"{path}: its plan differs from {paths[0]}'s in {diff or 'v'}")
        except ValueError:
            remove_tinylora(model)
            raise
        vs.append(v.float())
    bank.vs = torch.stack(vs).to(bank.v.device)
    return bank
