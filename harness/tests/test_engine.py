"""Specifications of harness/engine.py: the arguments an engine is built with, vLLM's log filter.
CPU only, no network (the engine itself: test_rollout.py, slow)."""
import logging

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
