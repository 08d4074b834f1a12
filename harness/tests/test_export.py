"""Tests of harness/export.py: the merged folder and the standard LoRA give the adapter's logits,
the share of ΔW a cast keeps, the plan line, and the command line (plan, merge, export-lora)."""
import json
import os

import pytest
import torch

import tinylora
from harness import export, models
from harness.tests.fixtures import SMOL_GGUF, cli, need_shared, tiny_model


def test_plan_line_names_the_tiles():
    names = [f"m{i}" for i in range(196)]
    u, groups = tinylora.plan_groups(names, 2, params=13)
    text = export.plan_text(196, ["q_proj"], 2, u, groups, "tiled")
    assert "u=1, 13 tiles of 16 modules, the last 4 -> 13 trainable parameters = 52 bytes" in text
    u, groups = tinylora.plan_groups(names, 2, params=13, balanced=True)
    assert "13 groups of 15-16 modules" in export.plan_text(196, ["q_proj"], 2, u, groups, "tiled")
    u, groups = tinylora.plan_groups(names, 2, u=13, n_tie=196)
    text = export.plan_text(196, ["q"], 2, u, groups, "tiled")
    assert "u=13, 1 tile of 196 modules -> 13 trainable" in text


# ---- exports: merged folder and standard LoRA give the adapter's logits --------------------------

def trained_tiny_adapter(folder, tmp_path, targets=tinylora.DEFAULT_TARGETS):
    """The tiny folder's model with a trained-looking v; returns (adapted model, adapter path,
    logits, input)."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    bank = tinylora.apply_tinylora(m, params=6, targets=targets)
    with torch.no_grad():
        bank.v.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        x = torch.randint(0, 300, (2, 9))
        logits = m(x).logits
    path = tinylora.save_adapter(bank, str(tmp_path / "a.safetensors"), base_model=folder)
    return m, path, logits, x


def peft_or_skip():
    try:
        import peft  # noqa: F401
    except ImportError:
        if os.environ.get("TINYLORA_REQUIRE_SHARED") == "1":
            pytest.fail("peft is not installed but CI requires it (requirements-cpu.txt)")
        pytest.skip("peft not installed (a test-only dependency in requirements-cpu.txt)")


@pytest.mark.parametrize("targets", [tinylora.DEFAULT_TARGETS, ("q_proj", "up_proj")])
def test_exported_lora_in_peft_gives_the_adapter_logits(tiny_folder, tmp_path, targets):
    peft_or_skip()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    m, adapter, want, x = trained_tiny_adapter(tiny_folder, tmp_path, targets)
    export.write_lora(tinylora.load_adapter(tinylora.remove_tinylora(m), adapter),
                      str(tmp_path / "lora"), tiny_folder)
    cfg = json.load(open(tmp_path / "lora" / "adapter_config.json"))
    assert cfg["r"] == cfg["lora_alpha"] == 2 and cfg["target_modules"] == list(targets)
    base = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(x).logits
        got = PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()(x).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter matters
    # two fp32 orders of one product: round-off scales with the logits (seen: 1.2e-5 on ~3)
    assert torch.allclose(got, want, atol=1e-5 * (1 + want.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_folder_gives_the_adapter_logits(tiny_folder, tmp_path, dtype):
    from transformers import AutoModelForCausalLM
    m, adapter, want, x = trained_tiny_adapter(tiny_folder, tmp_path)
    tok = models.load_model(tiny_folder)[1]
    bank = tinylora.load_adapter(tinylora.remove_tinylora(m), adapter)
    export.write_merged(m, tok, bank, str(tmp_path / "merged"), getattr(torch, dtype))
    files = set(os.listdir(tmp_path / "merged"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert merged.dtype == getattr(torch, dtype)
    with torch.no_grad():
        got = merged(x).logits.float()
    if dtype == "float32":
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    else:  # one cast of W0 + ΔW (fp32 math) to bf16: the merged weights equal that cast exactly
        base = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
        bank = tinylora.load_adapter(base, adapter)
        for name in bank.layers:
            assert torch.equal(merged.get_parameter(f"{name}.weight"),
                               bank.merged(name, torch.bfloat16))


@pytest.mark.slow
def test_export_cli_writes_and_refuses_another_base_and_a_non_empty_folder(tiny_folder, tmp_path):
    _, good, _, _ = trained_tiny_adapter(tiny_folder, tmp_path)

    def export_cli(cmd, adapter, out, *more):
        return cli("harness.export", cmd, "--model", tiny_folder, "--adapter", adapter, "--out",
                   str(out), *more)
    p = export_cli("merge", good, tmp_path / "m", "--dtype", "bfloat16")
    assert p.returncode == 0 and "of ΔW" in p.stdout, p.stderr[-2000:]
    assert (tmp_path / "m" / "config.json").exists(), p.stderr[-2000:]
    p = export_cli("export-lora", good, tmp_path / "l")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "l" / "adapter_model.safetensors").exists(), p.stderr[-2000:]
    other = tiny_model("qwen2", vocab=49152, seed=5)
    adapter = tinylora.save_adapter(tinylora.apply_tinylora(other, params=7),
                                    str(tmp_path / "other.safetensors"))
    p = export_cli("merge", adapter, tmp_path / "merge")
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1, p.stderr[-1000:]
    assert "different base weights" in err[0], p.stderr[-1000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "merge").exists()
    # the other refusals in process (config.run_cli makes each ValueError the line above)
    with pytest.raises(ValueError, match="different base weights"):
        export.main(["export-lora", "--model", tiny_folder, "--adapter", adapter, "--out",
                     str(tmp_path / "export-lora")])
    assert not (tmp_path / "export-lora").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        export.main(["merge", "--model", tiny_folder, "--adapter", adapter, "--out",
                     str(tmp_path / "full")])
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_delta_kept_in_bf16_is_partial_and_in_fp32_complete():
    m = tiny_model("qwen2", vocab=300, layers=2).to(torch.bfloat16).float()  # W0 on the bf16 grid
    bank = tinylora.apply_tinylora(m, params=3)
    with torch.no_grad():
        bank.v.fill_(1e-3)  # |ΔW| ≈ 4e-4·|W0|, under half a bf16 step (2^-9 relative)
    assert export.delta_kept(bank, torch.float32) == pytest.approx(1.0, abs=1e-3)
    assert export.delta_kept(bank, torch.bfloat16) < 0.5  # measured: 0.35
    with torch.no_grad():
        bank.v.fill_(1.0)
    assert export.delta_kept(bank, torch.bfloat16) == pytest.approx(1.0, abs=0.05)


# ---- the plan on the command line ----------------------------------------------------------------

@pytest.mark.slow
def test_the_plan_cli_on_smollm2s_gguf():
    p = cli("harness.export", "plan", "--model", need_shared(SMOL_GGUF), "--params", "13")
    assert p.returncode == 0 and "210 modules" in p.stdout, p.stderr
    assert "13 trainable parameters = 52 bytes fp32 / 26 bytes bf16" in p.stdout


def test_the_plan_cli_prints_the_plan_and_refuses_an_infeasible_budget(tiny_folder, capsys):
    export.main(["plan", "--model", tiny_folder, "--params", "13", "--map"])
    out = capsys.readouterr().out
    assert "14 modules" in out and "13 trainable parameters = 52 bytes" in out
    assert out.count("  group ") == 13
    with pytest.raises(ValueError, match=r"nearest feasible budgets: \[52, 56\]"):
        export.main(["plan", "--model", tiny_folder, "--params", "59"])  # prime, > 14 modules
    with pytest.raises(ValueError, match="not found"):
        export.main(["plan", "--model", "/nonexistent/x.gguf"])


def test_the_merged_route_swaps_in_the_bf16_merge_and_puts_everything_back():
    import rollout
    m = tiny_model("qwen2", vocab=300, layers=2)
    bank = tinylora.apply_tinylora(m, params=5)
    with torch.no_grad():
        bank.v.normal_(0, 0.5)
    W0 = {n: L.base.weight.clone() for n, L in bank.layers.items()}
    want = {n: bank.merged(n, torch.bfloat16).float() for n in bank.layers}  # cast once, fp32 math
    v = bank.v.detach().clone()
    generator = rollout.Generator(m, type("Tok", (), dict(eos_token_id=0))())
    with export.merged_route(generator, bank):
        assert bank.v.abs().max() == 0
        assert all(torch.equal(L.base.weight, want[n]) for n, L in bank.layers.items())
    assert torch.equal(bank.v, v) and all(torch.equal(L.base.weight, W0[n])
                                          for n, L in bank.layers.items())
