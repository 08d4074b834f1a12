"""Specifications of harness/engine.py: the arguments an engine is built with, vLLM's log filter,
the share check agreed by every rank, the prefix-cache reset's retry, the batch-invariant mode's
refusal on a CPU, the .gguf export vLLM loads. CPU only, no network (the engine itself:
test_rollout.py, slow)."""
import logging

import pytest
import torch

from harness import engine


def test_an_engine_on_the_cpu_gets_32_token_blocks_and_a_lora_slot_that_holds_r(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kw = engine.vllm_kwargs("f", "float32", 64, 3, 0.4, lora_rank=2, tensor_parallel=2, rank=3,
                            world=4)
    assert kw["block_size"] == 32 and kw["enforce_eager"] and kw["max_lora_rank"] == 8
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["seed"] == 3 + 3 // 2
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert "enable_lora" not in engine.vllm_kwargs("f", "float32", 64, 0, 0.4)


def test_only_vllms_named_notices_are_filtered():
    f = engine.VllmNoise()

    def rec(name, msg, *a):
        return logging.LogRecord(name, logging.WARNING, "f", 1, msg, a, None)
    push, cpu = "vllm.model_executor.model_loader.reload.layerwise", "vllm.v1.worker.cpu_worker"
    assert not f.filter(rec(push, "Following weights were not loaded from checkpoint: %s", {"a"}))
    assert not f.filter(rec(push, "%s: Failed to load weights", "RMSNorm"))
    assert not f.filter(rec(cpu, "%s is not found in LD_PRELOAD. For best performance", "x"))
    assert not f.filter(rec(cpu, "CPU backend doesn't allow to use `torch.set_num_threads` after"))
    assert f.filter(rec(push, "Allocating %.1f MB of device memory to buffers", 3.0))
    assert f.filter(rec(cpu, "KV cache is full"))
    assert f.filter(rec("vllm.other", "Following weights were not loaded from checkpoint: %s"))


SHARE_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from harness import engine
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.cuda.is_available = lambda: True
free = (10 if rank == 1 else 100) * 2 ** 30  # rank 1's card is mostly taken
torch.cuda.mem_get_info = lambda device=None: (free, 139 * 2 ** 30)
try:
    engine.check_vllm_share(0.4)
    verdict = "built"
except ValueError as e:
    verdict = str(e)
open(os.path.join({out!r}, f"rank{{rank}}.txt"), "w").write(verdict)
dist.barrier()  # neither rank leaves while the other still talks to it (gloo aborts otherwise)
dist.destroy_process_group()
"""


def test_under_torchrun_every_rank_refuses_when_one_rank_cannot_give_vllm_its_share(tmp_path):
    from harness.tests.fixtures import ROOT, torchrun
    script = tmp_path / "share.py"
    script.write_text(SHARE_SCRIPT.format(root=ROOT, out=str(tmp_path)))
    p = torchrun(2, str(script), timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    want = ("rank 1: --gpu-memory-utilization 0.4 asks vLLM for 55.6 GiB of the 139.0 GiB card, "
            "but only 10.0 GiB are free (the trainer holds the rest): lower it")
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [want, want]


def test_batch_invariant_mode_is_refused_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="runs on CUDA only, and this machine has no GPU"):
        engine.batch_invariant_env()


class ResetsAs:
    """Answers reset_prefix_cache as vLLM 0.32 would: `answers` in turn, and where a reset that
    preempts fails, its scheduler's RuntimeError (v1/core/sched/scheduler.py 2869-2875)."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []

    def reset_prefix_cache(self, reset_running_requests=False):
        self.calls.append(reset_running_requests)
        ok = self.answers.pop(0)
        if reset_running_requests and not ok:
            raise RuntimeError("Failed to reset KV cache even when all the running requests are "
                               "preempted and moved to the waiting queue.")
        return ok


def test_a_prefix_cache_reset_is_retried_once_preempting_then_refused_in_one_line():
    ok_first, ok_second, never = ResetsAs(True), ResetsAs(False, True), ResetsAs(False, False)
    engine.reset_prefix_cache(ok_first)
    engine.reset_prefix_cache(ok_second)
    assert ok_first.calls == [False] and ok_second.calls == [False, True]
    with pytest.raises(RuntimeError) as e:
        engine.reset_prefix_cache(never)
    assert str(e.value).startswith("vLLM could not reset its prefix cache") and "\n" not in str(
        e.value) and "would reuse old KV (vLLM: Failed to reset KV cache" in str(e.value)


def test_a_gguf_export_is_reused_for_the_same_file_and_redone_for_another_or_a_torn_one(tmp_path):
    """vLLM loads a .gguf model from its HF export under the work folder: serving model B from a
    folder that holds A's export would give B's requests A's weights."""
    exports = []

    class Model(torch.nn.Module):  # records each export; no adapter on it
        def save_pretrained(self, out):
            exports.append(out)

    class Tokenizer:
        def save_pretrained(self, out):
            pass

    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"A" * 10)
    b.write_bytes(b"B" * 20)
    work = str(tmp_path / "work")

    def export(gguf):
        return engine.hf_folder(Model(), Tokenizer(), None, str(gguf), work)

    out = export(a)
    assert export(a) == out and len(exports) == 1  # the same file: reused
    export(b)
    assert len(exports) == 2  # another file: exported again
    (tmp_path / "work" / "hf_model" / "exported_from.json").unlink()  # cut short before its stamp
    export(b)
    assert len(exports) == 3
