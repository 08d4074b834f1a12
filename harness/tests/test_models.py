"""Specifications of harness/models.py: the runtime 'auto' resolves to, and the cached GGUF parse
(which must change nothing). CPU only, no network."""
import pytest
import torch

from harness import models
from harness.tests.fixtures import SMOL_GGUF


def test_auto_on_a_cpu_machine_is_the_cpu_in_fp32_one_process_no_checkpointing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rt = models.runtime("auto", "auto", "hf", 60, "auto")
    assert (rt.device, rt.dtype, rt.backend, rt.rank, rt.world) == ("cpu", torch.float32, "hf",
                                                                    0, 1)
    assert rt.grad_checkpointing is False
    assert models.runtime("cpu", "bfloat16", "hf", 60, "on").grad_checkpointing is True


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
