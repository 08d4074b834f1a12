"""Specifications of tinylora.py, proven as properties over random tiny models (CPU, no network):
(a) zero-init is bit-exact, (b) the model trains exactly the requested scalars, (c) the math.
Run: pytest -q test_tinylora.py"""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, example, given, settings, strategies as st

import tinylora as T
from harness.tests.fixtures import tiny_model

PROPERTY = settings(max_examples=40, deadline=None)
ARCHS = ["llama", "qwen2"]


@st.composite
def models(draw, layers=st.integers(1, 3)):
    """A random tiny Llama- or Qwen2-like model built from its config: layers, width, grouped
    heads (head_dim 16 or 32), MLP width, tied or untied embeddings; and a subset of the targets."""
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
    m = tiny_model(draw(st.sampled_from(ARCHS)), seed=draw(st.integers(0, 99)), vocab=64,
                   hidden=heads * draw(st.sampled_from([16, 32])), heads=heads, kv_heads=kv,
                   inter=draw(st.sampled_from([24, 48, 80])), layers=draw(layers),
                   tie=draw(st.booleans()))
    k = draw(st.integers(1, 7))
    targets = draw(st.permutations(T.DEFAULT_TARGETS))[:k]
    return m, tuple(t for t in T.DEFAULT_TARGETS if t in targets)


@st.composite
def plans(draw, n):
    """apply_tinylora's arguments for n modules: a params budget (u·groups, or any number one time
    in four) or (u, n_tie); tiled or structured; r 1..3; TinyLoRA or LoRA-XS; an exact or a
    randomized SVD; independent or the fork's P; v in fp32, bf16 or fp16. It may be infeasible: the
    tests say what must then happen."""
    r, lora_xs = draw(st.integers(1, 3)), draw(st.booleans())
    u = r * r if lora_xs else draw(st.integers(1, r * r + 2))
    if not draw(st.booleans()):
        plan = dict(u=u, n_tie=draw(st.integers(1, n + 1)))
    elif draw(st.integers(0, 3)):
        plan = dict(params=min(u, r * r) * draw(st.integers(1, n)))
    else:
        plan = dict(params=draw(st.integers(1, n * r * r + 3)))
    return dict(plan, r=r, lora_xs=lora_xs, tie=draw(st.sampled_from(["tiled", "structured"])),
                svd=draw(st.sampled_from(["exact", "randomized"])),
                projections=draw(st.sampled_from(["independent", "fork"])),
                v_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])))


def n_adapted(m, targets):
    return sum(1 for name, mod in m.named_modules()
               if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets)


def adapt(m, targets, plan):
    """apply_tinylora, or None where the plan is infeasible for this model (one-line ValueError)."""
    try:
        return T.apply_tinylora(m, targets=targets, **plan)
    except ValueError:
        return None


def adapted(m, targets, plan):
    """apply_tinylora on a feasible plan: an infeasible draw is discarded (hypothesis's assume),
    never counted as a pass."""
    bank = adapt(m, targets, plan)
    assume(bank is not None)
    return bank


def tokens(seed=0, vocab=64, shape=(2, 7)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---- (a) zero-init equivalence: v = 0 is the base model, to the bit ---------------------------

@PROPERTY
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_zero_init_is_bit_identical_to_the_base_for_every_model_plan_and_dtype(data, dtype):
    m, targets = data.draw(models())
    m = m.to(dtype)
    x = tokens()
    with torch.no_grad():
        base = m(x).logits
    bank = adapted(m, targets, data.draw(plans(n_adapted(m, targets))))
    with torch.no_grad():
        assert torch.equal(m(x).logits, base)
        bank.v.fill_(0.5)
        assert not torch.equal(m(x).logits, base)  # and a non-zero v does change it


def test_zero_init_is_bit_identical_on_smollm2(smol):
    model, tok = smol
    x = tok(["What is 2+3?", "Natalia sold clips to 48 of her friends."], return_tensors="pt",
            padding=True)
    with torch.no_grad():
        base = model(**x).logits
    bank = T.apply_tinylora(model, params=13)
    try:
        assert len(bank.layers) == 210 and bank.v.numel() == 13
        with torch.no_grad():
            assert torch.equal(model(**x).logits, base)
    finally:
        T.remove_tinylora(model)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, base)  # the base weights were never touched


@pytest.mark.slow
def test_zero_init_is_bit_identical_on_smollm2_in_bf16(smol):
    import copy
    model = copy.deepcopy(smol[0]).to(torch.bfloat16)  # the shared fixture stays fp32
    x = smol[1](["What is 2+3?"], return_tensors="pt")
    with torch.no_grad():
        base = model(**x).logits
        T.apply_tinylora(model, params=13)
        assert torch.equal(model(**x).logits, base)


# ---- (b) budgets: exactly N scalars, the author's tiles whenever they exist -------------------

def tilings(n, r, N):
    """Every (u, n_tie), u ≤ r², whose consecutive tiles of n modules (last shorter) give N."""
    return [(u, w) for u in range(1, r * r + 1) for w in range(1, n + 1)
            if u * math.ceil(n / w) == N]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 300), r=st.integers(1, 3), N=st.integers(1, 2700))
def test_a_budget_is_met_exactly_by_the_authors_tiles_when_they_exist_else_refused(n, r, N):
    names = [f"m{i}" for i in range(n)]
    feasible = [(u, g) for u in range(1, r * r + 1) for g in range(1, n + 1) if u * g == N]
    if not feasible:
        with pytest.raises(ValueError, match="nearest feasible"):
            T.plan_groups(names, r, params=N)
        return
    u, groups = T.plan_groups(names, r, params=N)
    assert sum(groups, []) == names and u * len(groups) == N  # every module once, in order
    sizes = [len(g) for g in groups]
    if tilings(n, r, N):  # the smallest u; then an n_tie that is a power of two, else the least
        t = min(u for u, _ in tilings(n, r, N))
        widths = sorted(w for u, w in tilings(n, r, N) if u == t)
        w = next((w for w in widths if w in (1, 2, 4, 8, 16, 32, 64, 128, 256)), widths[0])
        assert (u, sizes) == (t, [min(w, n - i) for i in range(0, n, w)])
    else:  # even groups with the least u
        assert (u, len(groups)) == min(feasible) and max(sizes) - min(sizes) <= 1


@PROPERTY
@given(data=st.data())
def test_the_model_trains_exactly_the_planned_scalars_and_nothing_else(data):
    m, targets = data.draw(models())
    adapted = [name for name, mod in m.named_modules()
               if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets]
    plan = data.draw(plans(len(adapted)))
    bank = adapt(m, targets, plan)
    if bank is None:  # refused: then no (u, groups) of the tiled plan makes exactly params
        assert "params" in plan and (plan["tie"] == "structured" or not any(
            plan["params"] == u * g for u in allowed_u(plan) for g in range(1, len(adapted) + 1)))
        return
    want = plan["params"] if "params" in plan else (
        plan["u"] * sum(math.ceil(len(s) / plan["n_tie"]) for s in types_of(adapted, plan["tie"])))
    assert bank.v.numel() == want and sorted(bank.layers) == sorted(adapted)
    with torch.no_grad():
        bank.v.normal_()
    loss = m(tokens()).logits.square().mean()
    assert [id(t) for t in graph_leaves(loss)] == [id(bank.v)]  # only v, and all of it, is trained
    loss.backward()
    assert bank.v.grad.abs().sum(1).min() > 0


def allowed_u(plan):
    return [plan["r"] ** 2] if plan["lora_xs"] else range(1, plan["r"] ** 2 + 1)


def types_of(names, tie):
    """The sequences tying cuts: all names (tiled) or one per module type (structured)."""
    if tie == "tiled":
        return [names]
    kinds = [n.split(".", 3)[-1] for n in names]
    return [[n for n, k in zip(names, kinds) if k == kind] for kind in dict.fromkeys(kinds)]


def graph_leaves(t):
    """The leaf tensors t's autograd graph accumulates gradients into (found by walking it)."""
    seen, stack, leaves = set(), [t.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad: a leaf that requires grad
            leaves.append(fn.variable)
        stack += [f for f, _ in fn.next_functions]
    return leaves


def test_the_papers_budgets_on_the_7b_shape_are_fig_1s_tiles():
    names = [f"model.layers.{i // 7}.{t}" for i, t in enumerate(["q", "k", "v", "o", "g", "u",
                                                                  "d"] * 28)]
    assert T.plan_groups(names, 2, params=13) == T.plan_groups(names, 2, u=1, n_tie=16)
    assert [len(g) for g in T.plan_groups(names, 2, params=13)[1]] == [16] * 12 + [4]
    for N, sizes in [(1, [196]), (2, [128, 68]), (4, [64, 64, 64, 4]), (7, [32] * 6 + [4]),
                     (25, [8] * 24 + [4]), (49, [4] * 49), (98, [2] * 98), (196, [1] * 196)]:
        u, groups = T.plan_groups(names, 2, params=N)
        assert (u, [len(g) for g in groups]) == (1, sizes), N
    assert [len(g) for g in T.plan_groups(names, 2, params=3)[1]] == [66, 66, 64]  # no power of 2
    assert T.plan_groups(names, 2, params=392)[0] == 2
    with pytest.raises(ValueError, match=r"nearest feasible budgets: \[195, 196, 198, 200\]"):
        T.plan_groups(names, 2, params=197)


def test_lora_xs_counts_groups_of_r_squared_and_refuses_more_than_the_modules_hold():
    names = [f"m{i}" for i in range(196)]
    assert T.plan_groups(names, 2, params=784, lora_xs=True) == (4, [[n] for n in names])
    with pytest.raises(ValueError, match=r"\(LoRA-XS: u = r²\); nearest feasible .*\[780, 784\]"):
        T.plan_groups(names, 2, params=1568, lora_xs=True)
    with pytest.raises(ValueError, match=r"nearest feasible budgets: \[8, 12, 16\]"):
        T.plan_groups(names[:4], 2, params=13, lora_xs=True)


def test_structured_groups_hold_one_module_type_over_consecutive_layers():
    bank = T.apply_tinylora(tiny_model("llama", vocab=100, layers=6), params=14, tie="structured")
    assert bank.v.numel() == 14 and len(bank.groups) == 14
    for g in bank.groups:
        layers = [int(n.split(".")[2]) for n in g]
        assert len({n.split(".", 3)[3] for n in g}) == 1
        assert layers == list(range(layers[0], layers[0] + len(layers)))
    with pytest.raises(ValueError, match="one group per module type"):
        T.apply_tinylora(tiny_model("llama", vocab=100), params=5, tie="structured")


@pytest.mark.parametrize("bad,named", [
    (dict(params=0), "params must be positive, got 0"), (dict(params=-3), "got -3"),
    (dict(u=0, n_tie=1), "got u=0, n_tie=1"), (dict(u=1, n_tie=0), "got u=1, n_tie=0"),
    (dict(params=13, u=1), "got params=13, u=1, n_tie=None"),
    (dict(), "got params=None, u=None, n_tie=None"),
    (dict(params=2, tie="braided"), "unknown tying 'braided'"),
    (dict(u=3, n_tie=1, lora_xs=True), "got u=3"), (dict(params=5), "params=5 on 2 modules")])
def test_a_bad_plan_is_refused_in_one_line_naming_the_value(bad, named):
    with pytest.raises(ValueError) as e:
        T.plan_groups(["a", "b"], 2, **bad)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_a_missing_target_and_a_second_application_are_refused():
    m = tiny_model("qwen2", vocab=100)
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] not found among the linear layers"):
        T.apply_tinylora(m, params=1, targets=("q_proj", "qkv_proj"))
    T.apply_tinylora(m, params=1)
    with pytest.raises(ValueError, match="already"):
        T.apply_tinylora(m, params=1)


def test_one_v_of_13_shared_by_every_module_moves_the_model_in_13_directions():
    """PEFT's reading of 13 (u = 13 > r², one group): each module's R is its own linear image of v,
    so the shared v keeps all 13 directions."""
    m = tiny_model("qwen2", vocab=300, layers=2)
    bank = T.apply_tinylora(m, u=13, n_tie=14)
    assert bank.v.shape == (1, 13)
    J = torch.stack([L.P.reshape(13, -1).T for L in bank.layers.values()])  # ∂R/∂v (14, 4, 13)
    assert torch.linalg.matrix_rank(J.reshape(-1, 13)) == 13


@PROPERTY
@given(data=st.data())
def test_changing_v_of_one_group_moves_every_module_of_that_group_and_no_other(data):
    """Tying, as the forward sees it: with v zero but for group g, exactly bank.groups[g]'s layers
    change their output, each with its own P."""
    m, targets = data.draw(models())
    bank = adapted(m, targets, data.draw(plans(n_adapted(m, targets))))
    g = data.draw(st.integers(0, len(bank.groups) - 1))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    moved = set()
    with torch.no_grad():
        bank.v[g] = torch.randn(bank.v.shape[1], generator=gen).clamp(-2, 2) + 3  # never 0
        for name, L in bank.layers.items():
            x = torch.randn(2, L.base.in_features, generator=gen)
            moved |= {name} if not torch.equal(L(x), L.base(x)) else set()
    assert moved == set(bank.groups[g])
    Ps = [bank.layers[n].P for n in bank.groups[g]]
    if not bank.config["lora_xs"] and bank.config["projections"] == "independent":
        assert all(not torch.equal(a, b) for i, a in enumerate(Ps) for b in Ps[i + 1:])


@pytest.mark.parametrize("arch,u", [("qwen2", 1), ("llama", 3)])
def test_the_forks_P_is_what_its_own_procedure_draws(arch, u):
    """The fork (verl-lora c5b65fc2): torch.manual_seed(42); svd_lowrank of Wᵀ (rank 2, 10
    iterations) on the CPU; v = randn(u); P = randn(u, r, r): replayed literally, per module."""
    bank = T.apply_tinylora(tiny_model(arch, vocab=100, inter=96), u=u, n_tie=3,
                            projections="fork")
    for L in bank.layers.values():
        torch.manual_seed(42)
        torch.svd_lowrank(L.base.weight.T.float(), q=2, niter=10)
        torch.randn(u)
        assert torch.equal(L.P, torch.randn(u, 2, 2) / math.sqrt(u))
    assert bank.config["projections"] == "fork"


def test_on_the_7b_layout_the_fork_gives_five_projections_one_P_and_k_v_another():
    """Qwen2.5-7B's 28 layers × 7 shapes (no weights): P depends on min(out, in) alone, so q, o,
    gate, up and down (3584) share one P in every layer, k and v (512) another."""
    shapes = dict(q=(3584, 3584), k=(512, 3584), v=(512, 3584), o=(3584, 3584),
                  gate=(18944, 3584), up=(18944, 3584), down=(3584, 18944))
    P = {(layer, k): T.P_fork(1, 2, min(s)) for layer in range(28) for k, s in shapes.items()}
    distinct = {tuple(p.flatten().tolist()) for p in P.values()}
    assert len(distinct) == 2 and torch.equal(P[0, "q"], P[27, "down"])
    assert torch.equal(P[3, "k"], P[9, "v"]) and not torch.equal(P[0, "q"], P[0, "k"])


def test_an_unknown_projection_rule_is_refused():
    with pytest.raises(ValueError, match="projections independent or fork"):
        T.apply_tinylora(tiny_model("qwen2", vocab=100), params=1, projections="shared")


# ---- (c) the math -----------------------------------------------------------------------------

@PROPERTY
@given(data=st.data())
def test_every_adapted_layer_equals_the_dense_fp64_formula(data):
    """y = x (W + U Σ R Vᵀ)ᵀ + b with R = Σᵢ vᵢPᵢ, in fp64 from the layer's own factors."""
    m, targets = data.draw(models(layers=st.integers(1, 2)))
    bank = adapted(m, targets, data.draw(plans(n_adapted(m, targets))))
    with torch.no_grad():
        bank.v.normal_(generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    for L in bank.layers.values():
        x = torch.randn(3, L.base.in_features, dtype=torch.float64)
        W, b = L.base.weight.double(), L.base.bias
        v, P = bank.v[L.group].detach().double(), L.P.double()
        R = sum(v[i] * P[i] for i in range(len(v)))
        ref = x @ (W + L.U.double() @ torch.diag(L.S.double()) @ R @ L.V.double().T).T
        ref = ref + (b.double() if b is not None else 0)
        got = L(x.float()).double()
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@PROPERTY
@given(data=st.data())
def test_delta_W_has_rank_at_most_r_and_is_the_exported_LoRAs_B_times_A(data):
    m, targets = data.draw(models(layers=st.integers(1, 2)))
    plan = data.draw(plans(n_adapted(m, targets)))
    bank = adapted(m, targets, plan)
    with torch.no_grad():
        bank.v.normal_()
    for name in bank.layers:
        dW = bank.delta(name)
        A, B = bank.lora(name)
        assert torch.linalg.matrix_rank(dW.double(), rtol=1e-6) <= plan["r"]
        assert A.shape[0] == B.shape[1] == plan["r"]
        assert torch.allclose(B @ A, dW, rtol=1e-5, atol=1e-6 * dW.abs().max().item())


@PROPERTY
@given(data=st.data(), a=st.floats(-2, 2), b=st.floats(-2, 2))
def test_a_layers_update_is_linear_in_v(data, a, b):
    """layer(x; a·v₁ + b·v₂) − base(x) = a·(layer(x; v₁) − base(x)) + b·(layer(x; v₂) − base(x))."""
    m, targets = data.draw(models(layers=st.just(1)))
    bank = T.apply_tinylora(m, targets=targets, u=3, n_tie=1)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    v1, v2 = torch.randn(bank.v.shape, generator=g), torch.randn(bank.v.shape, generator=g)
    L = next(iter(bank.layers.values()))
    x = torch.randn(4, L.base.in_features, generator=g)

    def update(v):
        with torch.no_grad():
            bank.v.copy_(v)
            return (L(x) - L.base(x)).double()
    lhs, rhs = update(a * v1 + b * v2), a * update(v1) + b * update(v2)
    assert torch.allclose(lhs, rhs, atol=1e-5 * (1 + rhs.abs().max().item()))


@PROPERTY
@given(data=st.data())
def test_merged_weights_give_the_unmerged_forward_and_leave_W0_untouched(data):
    m, targets = data.draw(models())
    twin = m.__class__(m.config).eval()  # an untouched copy
    twin.load_state_dict(m.state_dict())
    bank = adapted(m, targets, data.draw(plans(n_adapted(m, targets))))
    with torch.no_grad():
        bank.v.normal_(0, 0.5)
        x = tokens()
        merged = {f"{n}.weight": bank.merged(n) for n in bank.layers}
        W0 = {n: L.base.weight.clone() for n, L in bank.layers.items()}
        twin.load_state_dict(merged, strict=False)
        assert torch.allclose(twin(x).logits, m(x).logits, rtol=1e-4, atol=1e-4)
        assert all(torch.equal(bank.layers[n].base.weight, W0[n]) for n in bank.layers)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(2, 30), n=st.integers(2, 30), r=st.integers(1, 4), seed=st.integers(0, 1000),
       method=st.sampled_from(["exact", "randomized"]))
@example(m=23, n=17, r=1, seed=17, method="exact")  # σ₁ ≈ σ₂: the rank-1 product is ill-posed
def test_the_svd_factors_are_a_best_rank_r_approximation(m, n, r, seed, method):
    """S = fp64's σ₁…σ_r; U, V orthonormal; ‖W − U Σ Vᵀ‖² = Σᵢ₍ᵢ₎ᵣ₎ σᵢ² (Eckart–Young): all of it
    holds even when σ_r ≈ σ_(r+1), where the factors themselves are ill-conditioned."""
    r = min(r, m, n)
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    U, S, V = T.svd_factors(W, r, method)
    sigma = torch.linalg.svdvals(W.double())
    assert torch.allclose(S.double(), sigma[:r], rtol=1e-4)
    assert torch.allclose(U.T @ U, torch.eye(r), atol=1e-5)
    assert torch.allclose(V.T @ V, torch.eye(r), atol=1e-5)
    err = (W.double() - (U * S).double() @ V.double().T).square().sum()
    assert err.item() == pytest.approx(sigma[r:].square().sum().item(), rel=1e-3, abs=1e-4)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(40, 96), n=st.integers(40, 96), r=st.integers(1, 4),
       seed=st.integers(0, 1000), decay=st.sampled_from([0.0, 0.02, 0.1]))
def test_the_randomized_svd_truncates_to_eckart_young_within_its_tolerance(m, n, r, seed, decay):
    """Widths above q = r + 32: the sketch is a true subspace, so truncation and the power
    iterations are exercised. On Gaussian matrices (flat spectra: the hard case) and decaying ones,
    σ₁…σ_r within 1e-4 and ‖W − U Σ Vᵀ‖² within 1e-4 of Σᵢ₍ᵢ₎ᵣ₎ σᵢ² (svd_factors' tolerance)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) * torch.exp(-decay * torch.arange(n))  # column scales
    assert T.OVERSAMPLE + r < min(m, n)
    U, S, V = T.svd_factors(W, r, "randomized", seed=seed)
    sigma = torch.linalg.svdvals(W.double())
    assert torch.allclose(S.double(), sigma[:r], rtol=1e-4)
    assert torch.allclose(U.T @ U, torch.eye(r), atol=1e-5)
    assert torch.allclose(V.T @ V, torch.eye(r), atol=1e-5)
    err = (W.double() - (U * S).double() @ V.double().T).square().sum()
    assert err.item() == pytest.approx(sigma[r:].square().sum().item(), rel=1e-4)


def test_a_rank_larger_than_the_matrix_and_an_unknown_svd_are_refused():
    with pytest.raises(ValueError, match="exceeds"):
        T.svd_factors(torch.randn(3, 5), 4)
    with pytest.raises(ValueError, match="unknown SVD method"):
        T.svd_factors(torch.randn(3, 5), 1, "lanczos")


@settings(max_examples=40, deadline=None)
@given(m=st.integers(3, 20), n=st.integers(3, 20), seed=st.integers(0, 1000),
       flips=st.integers(0, 7))
def test_signs_are_canonical_under_flips(m, n, seed, flips):
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    r = min(3, m, n)
    U, V = U[:, :r], Vh[:r].T
    s = torch.tensor([-1.0 if flips >> i & 1 else 1.0 for i in range(r)])
    a, b = T.canonical_signs(U, V), T.canonical_signs(U * s, V * s)  # (U s)(V s)ᵀ: the same SVD
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and ((a[0] ** 3).sum(0) > 0).all()


def test_the_randomized_svd_draws_its_sketch_from_a_cpu_generator_keyed_by_the_seed():
    """Exactly the subspace iteration from Ω ~ torch.Generator().manual_seed(seed) (what a GPU
    rebuild draws too), and nothing from the global RNG."""
    W = torch.randn(60, 45) @ torch.diag(torch.linspace(3, 1, 45))
    torch.manual_seed(999)
    got = T.svd_factors(W, 2, "randomized", seed=5, oversample=2, niter=1)  # far from converged
    after = torch.rand(1)
    torch.manual_seed(999)
    assert torch.equal(torch.rand(1), after)  # the SVD drew nothing from the global stream
    omega = torch.randn(45, 4, generator=torch.Generator().manual_seed(5))  # (in, r + oversample)
    U, S, V = T.randomized_svd(W, omega, 1)
    U, V = T.canonical_signs(U[:, :2], V[:, :2])
    assert torch.equal(got[0], U) and torch.equal(got[1], S[:2]) and torch.equal(got[2], V)


def test_the_randomized_svd_meets_its_accuracy_on_smollm2s_flattest_spectrum(smol):
    """layers.17.self_attn.v_proj has σ₂/σ₃ = 1.0015, the flattest of SmolLM2's 210 matrices: the
    default sketch (q = r + 32, 20 iterations) is within σ 1e-5 relative and vectors 9e-3; a common
    weaker setting is not."""
    W = smol[0].get_submodule("model.layers.17.self_attn.v_proj").weight
    assert (lambda s: s[1] / s[2])(torch.linalg.svdvals(W.double())) < 1.002
    Ue, Se, Ve = T.svd_factors(W, 2, "exact")

    def close(U, S, V):
        return (((S - Se).abs() / Se).max() < 1e-5 and (U - Ue).abs().max() < 9e-3
                and (V - Ve).abs().max() < 9e-3)
    assert close(*T.svd_factors(W, 2, "randomized"))
    assert not close(*T.svd_factors(W, 2, "randomized", oversample=8, niter=2))


def test_P_depends_only_on_the_seed_and_the_module_name_and_is_pinned():
    assert torch.equal(T.P_random(3, 2, 0, "x"), T.P_random(3, 2, 0, "x"))
    assert not torch.equal(T.P_random(3, 2, 0, "x"), T.P_random(3, 2, 1, "x"))
    assert not torch.equal(T.P_random(3, 2, 0, "x"), T.P_random(3, 2, 0, "y"))
    # golden values: a saved adapter means something only if P is the same on every machine
    got = T.P_random(2, 2, 0, "model.layers.0.self_attn.q_proj").flatten().tolist()
    want = [-0.34955063, 0.54781234, -1.06894994, 0.04622271, 0.47869545, -0.29810453,
            -0.44179338, -0.72532284]
    assert got == pytest.approx(want, abs=1e-7)
    assert T.stable_seed(0, "a") == 3597162743808503674
    assert abs(T.P_random(4096, 2, 0, "z").std().item() * math.sqrt(4096) - 1) < 0.05  # N(0,1)/√u


def test_lora_xs_R_is_v_reshaped():
    m = tiny_model("qwen2", vocab=100, layers=2)
    bank = T.apply_tinylora(m, params=28, lora_xs=True)  # 7 groups of r² = 4
    with torch.no_grad():
        bank.v.normal_()
    L = next(iter(bank.layers.values()))
    assert bank.v.shape == (7, 4) and torch.equal(T.R(bank.v[L.group], L.P),
                                                   bank.v[L.group].reshape(2, 2))


# ---- the adapter file ------------------------------------------------------------------------

@PROPERTY
@given(data=st.data())
def test_save_then_load_reproduces_the_logits_bit_for_bit(data, tmp_path_factory):
    m, targets = data.draw(models())
    seed = data.draw(st.integers(0, 99))
    twin = m.__class__(m.config).eval()
    twin.load_state_dict(m.state_dict())
    bank = adapted(m, targets, data.draw(plans(n_adapted(m, targets))))
    with torch.no_grad():
        bank.v.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
        want = m(tokens(seed)).logits
    path = T.save_adapter(bank, str(tmp_path_factory.mktemp("a") / "a.safetensors"), base_model="x")
    loaded = T.load_adapter(twin, path)
    with torch.no_grad():
        assert torch.equal(twin(tokens(seed)).logits, want)
    assert torch.equal(loaded.v, bank.v) and loaded.config["base_model"] == "x"


def test_save_then_load_reproduces_the_logits_on_smollm2(smol, tmp_path):
    model, tok = smol
    x = tok(["Let's think step by step."], return_tensors="pt")
    bank = T.apply_tinylora(model, params=13)
    try:
        with torch.no_grad():
            bank.v.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
            want = model(**x).logits
        path = T.save_adapter(bank, str(tmp_path / "smol.safetensors"))
        assert payload_bytes(path) == 52
    finally:
        T.remove_tinylora(model)
    T.load_adapter(model, path)
    try:
        with torch.no_grad():
            assert torch.equal(model(**x).logits, want)
    finally:
        T.remove_tinylora(model)


def trained_tiny(params=13, seed=0):
    m = tiny_model("qwen2", vocab=300, layers=2, seed=seed)
    bank = T.apply_tinylora(m, params=params)
    with torch.no_grad():
        bank.v.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return m, bank


def payload_bytes(path):
    header_len = int.from_bytes(open(path, "rb").read(8), "little")
    return os.path.getsize(path) - 8 - header_len


def test_13_scalars_are_52_bytes_in_fp32_and_26_in_bf16(tmp_path):
    _, bank = trained_tiny(13)
    assert payload_bytes(T.save_adapter(bank, str(tmp_path / "f.safetensors"))) == 52
    p16 = T.save_adapter(bank, str(tmp_path / "h.safetensors"), dtype=torch.bfloat16)
    v, meta = T.read_adapter(p16)
    assert payload_bytes(p16) == 26 and meta["v_dtype"] == "bfloat16"
    assert torch.equal(v, bank.v.detach().bfloat16())
    assert os.path.getsize(p16) < 8192  # the whole file, header included
    assert not any(f.name.startswith("h.safetensors.tmp") for f in tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_v_trained_in_half_precision_is_saved_and_loaded_bit_for_bit(dtype, tmp_path):
    m = tiny_model("qwen2", vocab=300, layers=2)
    bank = T.apply_tinylora(m, params=13, v_dtype=dtype)
    opt = torch.optim.AdamW([bank.v], lr=0.1)
    m(tokens(vocab=300)).logits.square().mean().backward()
    opt.step()  # an update rounded to the dtype
    assert bank.v.dtype == dtype and bank.v.abs().min() > 0
    path = T.save_adapter(bank, str(tmp_path / "a.safetensors"))
    assert payload_bytes(path) == 26
    loaded = T.load_adapter(tiny_model("qwen2", vocab=300, layers=2), path)
    assert loaded.v.dtype == dtype and torch.equal(loaded.v, bank.v)


def test_an_adapter_for_another_base_or_a_broken_file_is_refused_in_one_line(tmp_path):
    _, bank = trained_tiny(13)
    good = T.save_adapter(bank, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="different base weights"):
        T.load_adapter(tiny_model("qwen2", vocab=300, layers=2, seed=7), good)
    other = tiny_model("qwen2", vocab=300, layers=3)
    with pytest.raises(ValueError, match="another architecture"):
        T.load_adapter(other, good)
    assert not any(isinstance(x, T.TinyLoRALinear) for x in other.modules())  # left clean
    data = open(good, "rb").read()
    for name, content in [("trunc", data[:-10]), ("junk", b"\x00" * 40)]:
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        with pytest.raises(ValueError, match="not a readable TinyLoRA adapter"):
            T.read_adapter(str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(ValueError, match="No such file"):
        T.read_adapter(str(tmp_path / "nope.safetensors"))
    from safetensors.torch import save_file
    import json
    save_file({"v": bank.v.detach()}, str(tmp_path / "v99.safetensors"),
              metadata={"tinylora": json.dumps(dict(bank.config, format_version=99))})
    with pytest.raises(ValueError, match=r"adapter format \(99,"):
        T.read_adapter(str(tmp_path / "v99.safetensors"))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        T.save_adapter(bank, str(tmp_path / "x.safetensors"), dtype=torch.int8)


def test_the_fingerprint_refuses_other_svd_factors_and_keeps_its_own(tmp_path):
    m, bank = trained_tiny(13)
    good = T.save_adapter(bank, str(tmp_path / "a.safetensors"))
    saved = T.read_adapter(good)[1]["fingerprint"]
    T.remove_tinylora(m)
    assert torch.equal(T.load_adapter(m, good).v, bank.v)  # the same base, rebuilt: accepted
    T.remove_tinylora(m)
    other = T.apply_tinylora(m, params=13)
    L = next(iter(other.layers.values()))
    U0, V0 = L.U.clone(), L.V.clone()
    c, s = math.cos(0.02), math.sin(0.02)  # a 0.02 rad turn of (u₁, u₂) and (v₁, v₂): Σ, so σ₁,
    turn = torch.tensor([[c, s], [-s, c]])  # untouched (what a CUDA-drawn sketch once gave)
    L.U.copy_(U0 @ turn), L.V.copy_(V0 @ turn)
    assert T.fingerprint(other)["sigma1"] == saved["sigma1"]
    with pytest.raises(ValueError, match="SVD factors"):
        T.check_fingerprint(saved, T.fingerprint(other), good)
    L.U.copy_(U0), L.V.copy_(V0 + 1e-2 * torch.randn_like(V0) / V0.shape[0] ** 0.5)
    with pytest.raises(ValueError, match="SVD factors"):
        T.check_fingerprint(saved, T.fingerprint(other), good)
    L.V.copy_(V0)
    T.check_fingerprint(saved, T.fingerprint(other), good)


# ---- many adapters in one batch: each row served by its own v ------------------------------------

def saved_adapters(m, targets, plan, K, tmp):
    """K adapters of one plan on m, v drawn at random, saved under tmp; their paths (None: the plan
    is infeasible here)."""
    paths = []
    for k in range(K):
        bank = adapt(m, targets, plan)
        if bank is None:
            return None
        with torch.no_grad():
            bank.v.copy_(torch.randn(bank.v.shape, generator=torch.Generator().manual_seed(k)))
        paths.append(T.save_adapter(bank, str(tmp / f"a{k}.safetensors")))
        T.remove_tinylora(m)
    return paths


@PROPERTY
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_each_row_of_a_mixed_batch_is_its_adapter_alone_and_base_rows_are_the_base(
        data, dtype, tmp_path_factory):
    m, targets = data.draw(models())
    m = m.to(dtype)
    plan = dict(data.draw(plans(n_adapted(m, targets))), v_dtype=torch.float32)
    K = data.draw(st.integers(1, 4))
    paths = saved_adapters(m, targets, plan, K, tmp_path_factory.mktemp("k"))
    assume(paths is not None)
    rows = torch.tensor(data.draw(st.lists(st.integers(0, K), min_size=1, max_size=6)))
    x = tokens(data.draw(st.integers(0, 99)), shape=(len(rows), 5))
    with torch.no_grad():
        base = m(x).logits
        alone, exact = [base], [None]  # exact: adapter k's model computed in fp32
        for p in paths:
            T.load_adapter(m, p)
            alone.append(m(x).logits)
            exact.append(copy.deepcopy(m).float()(x).logits)
            T.remove_tinylora(m)
        T.load_adapters(m, paths).adapter_of_row = rows
        mixed = m(x).logits
    for i, k in enumerate(rows.tolist()):
        scale = alone[k][i].float().abs().max().item()
        if k == 0:  # index 0: v = 0, the base model to the bit
            assert torch.equal(mixed[i], base[i])
        elif dtype == torch.float32:  # the same math in another order: fp32 round-off
            assert (mixed[i] - alone[k][i]).abs().max() <= 1e-5 * (1 + scale)
        else:  # bf16 rounds the two orders differently (each up to ~0.16 on logits of ~3, both
            # ways, measured): the row is as near adapter k's fp32 answer as bf16 leaves it alone
            bf16_err = (alone[k].float() - exact[k]).abs().max()
            assert (mixed[i].float() - exact[k][i]).abs().max() <= 2 * bf16_err + 3e-2 * (1 + scale)


def test_a_batch_served_by_one_adapter_answers_as_that_adapter_greedily(tmp_path):
    import rollout
    m = tiny_model("qwen2", vocab=100, layers=2)
    paths = saved_adapters(m, T.DEFAULT_TARGETS, dict(params=13), 3, tmp_path)
    prompts = [tokens(s, vocab=100, shape=(1, n))[0].tolist() for s, n in ((1, 4), (2, 9), (3, 6))]

    class Tok:
        pad_token_id = 0
        decode = staticmethod(lambda ids, skip_special_tokens=True: str(ids))
    alone = []
    for p in paths:
        T.load_adapter(m, p)
        alone.append(rollout.generate_hf(m, Tok, prompts, 1, 8, 0.0, [2]))
        T.remove_tinylora(m)
    bank = T.load_adapters(m, paths)
    for k in (1, 2, 3):
        bank.adapter_of_row = torch.tensor([k] * 3)
        assert [c["ids"] for c in rollout.generate_hf(m, Tok, prompts, 1, 8, 0.0, [2])] == [
            c["ids"] for c in alone[k - 1]]
    bank.adapter_of_row = torch.tensor([3, 1, 2])  # and mixed: row i as its adapter alone
    mixed = rollout.generate_hf(m, Tok, prompts, 1, 8, 0.0, [2])
    assert [c["ids"] for c in mixed] == [alone[k - 1][i]["ids"] for i, k in enumerate((3, 1, 2))]
    bank.adapter_of_row = None  # back to training's forward: bank.v, the first file's
    assert [c["ids"] for c in rollout.generate_hf(m, Tok, prompts, 1, 8, 0.0, [2])] == [
        c["ids"] for c in alone[0]]


def test_a_file_written_before_projections_were_recorded_loads_alone_and_among_others(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    m = tiny_model("qwen2", vocab=300, layers=2)
    new, old = saved_adapters(m, T.DEFAULT_TARGETS, dict(params=13), 2, tmp_path)
    with safe_open(old, framework="pt") as f:
        v, meta = f.get_tensor("v"), json.loads(f.metadata()["tinylora"])
    del meta["projections"]  # as files were written before --projections (P: independent)
    save_file({"v": v}, old, metadata={"tinylora": json.dumps(meta)})
    assert T.load_adapter(m, old).config["projections"] == "independent"
    T.remove_tinylora(m)
    assert torch.equal(T.load_adapters(m, [new, old]).vs[2], v)


def test_adapters_of_another_base_or_plan_are_refused_naming_the_file(tmp_path):
    m = tiny_model("qwen2", vocab=300, layers=2)
    ours = saved_adapters(m, T.DEFAULT_TARGETS, dict(params=13), 2, tmp_path)
    (tmp_path / "seven").mkdir()
    (seven,) = saved_adapters(m, T.DEFAULT_TARGETS, dict(params=7), 1, tmp_path / "seven")
    (tmp_path / "fork").mkdir()  # the same v's shape and base, another P: as wrong
    (fork,) = saved_adapters(m, T.DEFAULT_TARGETS, dict(params=13, projections="fork"), 1,
                             tmp_path / "fork")
    other_base = tiny_model("qwen2", vocab=300, layers=2, seed=5)
    bank = T.apply_tinylora(other_base, params=13)
    stranger = T.save_adapter(bank, str(tmp_path / "stranger.safetensors"))
    for bad, why in [(seven, r"seven/a0.safetensors: its plan differs from .*/a0.safetensors's "
                             r"in \['group_sizes'\]"),
                     (fork, r"fork/a0.safetensors: its plan differs .* in \['projections'\]"),
                     (stranger, "stranger.safetensors: adapter was made for different base")]:
        with pytest.raises(ValueError, match=why):
            T.load_adapters(m, ours + [bad])
        assert not any(isinstance(x, T.TinyLoRALinear) for x in m.modules())  # left clean
