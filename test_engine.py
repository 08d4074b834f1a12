"""Tests of engine.py: EOS cutting, the HF sampler's log-probs, the vLLM weight push, checkpoints.
CPU only, no network; the vLLM tests are marked slow (run with --runslow, as CI does)."""
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

import engine
import task
import tinylora
import train_grpo as tg
from conftest import tiny_model, vllm_or_skip

HERE = os.path.dirname(os.path.abspath(engine.__file__))


def test_cut_at_eos_drops_everything_after_the_first_eos():
    assert engine.cut_at_eos([4, 5, 2, 7, 2], [.1, .2, .3, .4, .5], {2}) == ([4, 5, 2], [.1, .2, .3], True)
    assert engine.cut_at_eos([4, 5], [.1, .2], {2}) == ([4, 5], [.1, .2], False)


# ---- vLLM: sync and log-prob agreement ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llm(tiny_folder):
    vllm_or_skip()
    return engine.make_vllm(tiny_folder, "float32", 512, 0)


@pytest.mark.slow
@pytest.mark.parametrize("targets,T", [(tinylora.DEFAULT_TARGETS, 1.0), (("q_proj", "up_proj"), 1.0),
                                       (tinylora.DEFAULT_TARGETS, 0.7)])
def test_vllm_sync_matches_trainer_logprobs(tiny_llm, tiny_folder, smol_tok, targets, T):
    """The sampler's log-probs equal the trainer's, at T = 1 and at another temperature (vLLM returns
    them after the temperature only with logprobs_mode="processed_logprobs")."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    bank = tinylora.apply_tinylora(m, params=4, targets=targets)
    with torch.no_grad():
        bank.v.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    prompts = [task.prompt_ids(smol_tok, [r], [], 512)[0][1] for r in task.arith_rows("test")[:3]]
    eos = [smol_tok.eos_token_id]

    def gap():
        torch.manual_seed(0)
        comps = engine.generate_vllm(tiny_llm, smol_tok, prompts, 2, 12, T, eos)
        seqs = [(prompts[i // 2], c["ids"]) for i, c in enumerate(comps)]
        with torch.no_grad():
            lp = tg.token_logprobs(m, seqs, T)  # (b, c)
        mask = engine.completion_mask([len(c) for _, c in seqs], lp.shape[1])
        roll = engine.padded_logprobs(comps)
        return ((lp - roll).abs() * mask).max().item()

    stale = gap()  # vLLM still has W0 (or the previous test's weights): far from the adapter
    live, peak, total = [], [0], [0]
    alive = lambda: sum(t().nbytes for t in live if t() is not None)  # noqa: E731

    def watched(stream):  # the bytes of pushed tensors still held anywhere when the next one is made
        for name, t in stream:
            peak[0], total[0] = max(peak[0], alive() + t.nbytes), total[0] + t.nbytes
            live.append(weakref.ref(t))
            yield name, t
    tiny_llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=watched(engine.merged_stream(m, bank))))
    tiny_llm.reset_prefix_cache()
    assert gap() < 1e-3 < stale
    layer = max(sum(p.nbytes for p in m.model.layers[i].parameters() if p.dim() == 2) for i in range(len(m.model.layers)))
    assert len(live) >= len(bank.layers) and peak[0] <= layer, (peak[0], layer)  # never more than one layer at once
    print(f"streamed push: at most {peak[0]:,} bytes held at once; one layer {layer:,}; the whole push {total[0]:,}")
    with torch.no_grad():  # and back to the base: v = 0 pushes exactly W0
        bank.v.zero_()
    engine.sync_weights(tiny_llm, m, bank)
    assert gap() < 1e-3




# ---- exports: merged folder and standard LoRA give the adapter's logits ----------------------------------

def trained_tiny_adapter(folder, tmp_path, targets=tinylora.DEFAULT_TARGETS):
    """The tiny folder's model with a trained-looking v; returns (adapted model, adapter path, logits, input)."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    bank = tinylora.apply_tinylora(m, params=6, targets=targets)
    with torch.no_grad():
        bank.v.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        x = torch.randint(0, 300, (2, 9))
        logits = m(x).logits
    return m, tinylora.save_adapter(bank, str(tmp_path / "a.safetensors"), base_model=folder), logits, x


def cli(*argv):
    return subprocess.run([sys.executable, "tinylora.py", *argv], capture_output=True, text=True, cwd=HERE,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)


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
    engine.write_lora(tinylora.load_adapter(tinylora.remove_tinylora(m), adapter), str(tmp_path / "lora"), tiny_folder)
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
    tok = engine.load_model(tiny_folder)[1]
    engine.write_merged(m, tok, tinylora.load_adapter(tinylora.remove_tinylora(m), adapter), str(tmp_path / "merged"),
                        getattr(torch, dtype))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert merged.dtype == getattr(torch, dtype)
    with torch.no_grad():
        got = merged(x).logits.float()
    if dtype == "float32":
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    else:  # one cast of W0 + ΔW (fp32 math) to bf16: the merged weights equal that cast exactly
        bank = tinylora.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32), adapter)
        for name, W in bank.merged_weights(torch.bfloat16):
            assert torch.equal(merged.get_parameter(name), W)


@pytest.mark.slow
def test_export_cli_writes_and_refuses_another_base_and_a_non_empty_folder(tiny_folder, tmp_path):
    _, good, _, _ = trained_tiny_adapter(tiny_folder, tmp_path)
    p = cli("merge", "--model", tiny_folder, "--adapter", good, "--out", str(tmp_path / "m"), "--dtype", "bfloat16")
    assert p.returncode == 0 and "of ΔW" in p.stdout and (tmp_path / "m" / "config.json").exists(), p.stderr[-2000:]
    p = cli("export-lora", "--model", tiny_folder, "--adapter", good, "--out", str(tmp_path / "l"))
    assert p.returncode == 0 and (tmp_path / "l" / "adapter_model.safetensors").exists(), p.stderr[-2000:]
    other = tiny_model("qwen2", vocab=49152, seed=5)
    adapter = tinylora.save_adapter(tinylora.apply_tinylora(other, params=7), str(tmp_path / "other.safetensors"))
    for cmd in ("merge", "export-lora"):
        p = cli(cmd, "--model", tiny_folder, "--adapter", adapter, "--out", str(tmp_path / cmd))
        err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode == 2 and len(err) == 1 and "different base weights" in err[0], p.stderr[-1000:]
        assert "Traceback" not in p.stderr and not (tmp_path / cmd).exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    p = cli("merge", "--model", tiny_folder, "--adapter", adapter, "--out", str(tmp_path / "full"))
    assert p.returncode == 2 and "not empty" in p.stderr and (tmp_path / "full" / "x").read_text() == "keep me"


def test_delta_kept_in_bf16_is_partial_and_in_fp32_complete():
    m = tiny_model("qwen2", vocab=300, layers=2).to(torch.bfloat16).float()  # W0 on the bf16 grid, as a bf16 checkpoint
    bank = tinylora.apply_tinylora(m, params=3)
    with torch.no_grad():
        bank.v.fill_(1e-3)  # |ΔW| ≈ 4e-4·|W0|, under half a bf16 step (2^-9 relative)
    assert engine.delta_kept(bank, torch.float32) == pytest.approx(1.0, abs=1e-3)
    assert engine.delta_kept(bank, torch.bfloat16) < 0.5  # measured: 0.35
    with torch.no_grad():
        bank.v.fill_(1.0)
    assert engine.delta_kept(bank, torch.bfloat16) == pytest.approx(1.0, abs=0.05)


@pytest.mark.slow
def test_vllm_lora_push_matches_trainer_logprobs(tiny_folder, smol_tok, tmp_path):
    vllm_or_skip()
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    bank = tinylora.apply_tinylora(m, params=4)
    gen = engine.make_generator("vllm", m, smol_tok, bank, tiny_folder, str(tmp_path), torch.float32, 512, 0, 0.4, "lora")
    prompts = [task.prompt_ids(smol_tok, [r], [], 512)[0][1] for r in task.arith_rows("test")[:3]]

    def gap():
        comps = gen.generate(prompts, 2, 12, 1.0, seed=0)
        seqs = [(prompts[i // 2], c["ids"]) for i, c in enumerate(comps)]
        with torch.no_grad():
            lp = tg.token_logprobs(m, seqs, 1.0)
        mask = engine.completion_mask([len(c) for _, c in seqs], lp.shape[1])
        return ((lp - engine.padded_logprobs(comps)).abs() * mask).max().item()

    gen.push(bank)  # v = 0: a zero LoRA
    assert gap() < 1e-3
    with torch.no_grad():
        bank.v.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    stale = gap()  # vLLM still holds the zero LoRA
    gen.push(bank)
    assert gap() < 1e-3 < stale


def test_only_the_partial_push_warnings_are_filtered():
    import logging
    f = engine.PartialPushFilter()
    rec = lambda msg, *a: logging.LogRecord("vllm.x", logging.WARNING, "f", 1, msg, a, None)  # noqa: E731
    assert not f.filter(rec("Following weights were not loaded from checkpoint: %s", {"a"}))
    assert not f.filter(rec("%s: Failed to load weights", "RMSNorm"))
    assert f.filter(rec("Allocating %.1f MB of device memory to buffers", 3.0)) and f.filter(rec("KV cache is full"))


def test_vllm_requests_carry_one_seed_per_prompt_when_seeds_are_given():
    """On CUDA each prompt is its own seeded request (vLLM's GPU runner ignores torch's seed); on CPU none is."""
    pytest.importorskip("vllm")

    class Recorder:  # stands in for vllm.LLM to read the requests it is handed (no engine needed for this)
        def generate(self, prompts, sp, **kw):
            self.sp = sp
            return []

    llm = Recorder()
    engine.generate_vllm(llm, None, [[1, 2], [3]], 4, 5, 1.0, [0], seeds=engine.row_seeds(7, [2, 5], 1))
    assert [s.seed for s in llm.sp] == engine.row_seeds(7, [2, 5], 1) and all(s.n == 4 for s in llm.sp)
    engine.generate_vllm(llm, None, [[1, 2], [3]], 4, 5, 1.0, [0])
    assert llm.sp.seed is None
