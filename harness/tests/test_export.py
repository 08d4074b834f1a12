"""Tests of harness/export.py: the merged folder and the standard LoRA give the adapter's logits,
the share of ΔW a cast keeps, the plan line, and the command line (plan, merge, export-lora)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import tinylora
from harness import export, flags, models
from harness.tests.fixtures import SMOL_GGUF, need_shared, tiny_model


def test_plan_line_names_the_tiles():
    names = [f"m{i}" for i in range(196)]
    u, groups = tinylora.plan_groups(names, ["x"] * 196, 2, params=13)
    text = export.plan_text(196, ["q_proj"], 2, u, groups, "tiled")
    assert "u=1, 13 tiles of 16 modules, the last 4 -> 13 trainable parameters = 52 bytes" in text
    u, groups = tinylora.plan_groups(names, ["x"] * 196, 2, params=13, balanced=True)
    assert "13 groups of 15-16 modules" in export.plan_text(196, ["q_proj"], 2, u, groups, "tiled")
    u, groups = tinylora.plan_groups(names, ["x"] * 196, 2, u=13, n_tie=196)
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


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "harness.export", *argv], capture_output=True,
                          text=True,
                          cwd=flags.ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)


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
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_folder_gives_the_adapter_logits(tiny_folder, tmp_path, dtype):
    from transformers import AutoModelForCausalLM
    m, adapter, want, x = trained_tiny_adapter(tiny_folder, tmp_path)
    tok = models.load_model(tiny_folder)[1]
    export.write_merged(m, tok, tinylora.load_adapter(tinylora.remove_tinylora(m), adapter),
                        str(tmp_path / "merged"),
                        getattr(torch, dtype))
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
    p = cli("merge", "--model", tiny_folder, "--adapter", good, "--out", str(tmp_path / "m"),
            "--dtype", "bfloat16")
    assert p.returncode == 0 and "of ΔW" in p.stdout, p.stderr[-2000:]
    assert (tmp_path / "m" / "config.json").exists(), p.stderr[-2000:]
    p = cli("export-lora", "--model", tiny_folder, "--adapter", good, "--out", str(tmp_path / "l"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "l" / "adapter_model.safetensors").exists(), p.stderr[-2000:]
    other = tiny_model("qwen2", vocab=49152, seed=5)
    adapter = tinylora.save_adapter(tinylora.apply_tinylora(other, params=7),
                                    str(tmp_path / "other.safetensors"))
    for cmd in ("merge", "export-lora"):
        p = cli(cmd, "--model", tiny_folder, "--adapter", adapter, "--out", str(tmp_path / cmd))
        err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode == 2 and len(err) == 1, p.stderr[-1000:]
        assert "different base weights" in err[0], p.stderr[-1000:]
        assert "Traceback" not in p.stderr and not (tmp_path / cmd).exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    p = cli("merge", "--model", tiny_folder, "--adapter", adapter, "--out", str(tmp_path / "full"))
    assert p.returncode == 2 and "not empty" in p.stderr
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_delta_kept_in_bf16_is_partial_and_in_fp32_complete():
    # W0 on the bf16 grid, as a bf16 checkpoint
    m = tiny_model("qwen2", vocab=300, layers=2).to(torch.bfloat16).float()
    bank = tinylora.apply_tinylora(m, params=3)
    with torch.no_grad():
        bank.v.fill_(1e-3)  # |ΔW| ≈ 4e-4·|W0|, under half a bf16 step (2^-9 relative)
    assert export.delta_kept(bank, torch.float32) == pytest.approx(1.0, abs=1e-3)
    assert export.delta_kept(bank, torch.bfloat16) < 0.5  # measured: 0.35
    with torch.no_grad():
        bank.v.fill_(1.0)
    assert export.delta_kept(bank, torch.bfloat16) == pytest.approx(1.0, abs=0.05)


# ---- the plan on the command line ----------------------------------------------------------------

def run_cli(*args):
    return cli("plan", *args)


@pytest.mark.slow
def test_cli_prints_plan_for_smollm2_gguf():
    p = run_cli("--model", need_shared(SMOL_GGUF), "--params", "13")
    assert p.returncode == 0, p.stderr
    assert "210 modules" in p.stdout
    assert "13 trainable parameters = 52 bytes fp32 / 26 bytes bf16" in p.stdout


def test_cli_prints_the_plan_and_refuses_an_infeasible_budget(tiny_folder):
    p = run_cli("--model", tiny_folder, "--params", "13")
    assert p.returncode == 0 and "14 modules" in p.stdout, p.stderr
    assert "13 trainable parameters = 52 bytes" in p.stdout, p.stderr
    # 59 is prime and > 14 modules: no u·G with u ≤ 4
    p = run_cli("--model", tiny_folder, "--params", "59")
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "nearest feasible budgets: [52, 56]" in p.stderr
    p = run_cli("--model", "/nonexistent/x.gguf")
    assert p.returncode == 2 and "not found" in p.stderr


def test_trl_step_times_are_read_from_either_output():
    from harness import bench
    anchor = "TRL 1.16.0 + PEFT TinyLoRA (13 trainable): step times [120.5, 98.25, 130.0], median"
    assert bench.trl_median(anchor + " 120.5 s, total 400 s") == 120.5
    assert bench.trl_median('{"step_s": [3.0, 1.0]}') == 2.0
    with pytest.raises(ValueError, match="no step times"):
        bench.trl_median("Traceback (most recent call last):")


@pytest.mark.slow
def test_gguf_parsed_once_loads_the_same_model_and_tokenizer(smol, monkeypatch):
    """The cached GGUF reader and name map (harness.models.gguf_parsed_once) change nothing: the
    same weights, config, vocabulary and chat template as transformers' own three parses."""
    import contextlib
    monkeypatch.setattr(models, "gguf_parsed_once", contextlib.nullcontext)
    plain, plain_tok = models.load_model(SMOL_GGUF)
    (model, tok), a, b = smol, smol[0].state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert model.config.to_dict() == plain.config.to_dict()
    assert tok.get_vocab() == plain_tok.get_vocab() and tok.chat_template == plain_tok.chat_template
    import gguf
    assert not hasattr(gguf.GGUFReader, "cache_info")  # the patch ends with the load
