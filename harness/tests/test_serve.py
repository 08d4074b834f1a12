"""Specifications of harness/serve.py: a mixed batch answers each request as its adapter alone
(greedy and sampled), and a bad input is refused in one line with nothing written. A tiny random
model with the SmolLM2 tokenizer; CPU only, no network."""
import json

import pytest
import torch

import task
import tinylora
from harness import bench_serving, config, export, models, serve
from harness.files import read_jsonl
from harness.tests.fixtures import vllm_or_skip

QUESTIONS = ["What is 2 + 5?", "What is 3 + 4?", "Compute 6 + 1.", "What is 1 + 6?"]


@pytest.fixture(scope="module")
def adapters(tiny_folder, tmp_path_factory):
    """Three 13-scalar adapters of the tiny model, v large enough that each answers differently."""
    model, _ = models.load_model(tiny_folder)
    out, paths = tmp_path_factory.mktemp("adapters"), []
    for k, name in enumerate(("terse", "chatty", "odd")):
        bank = tinylora.apply_tinylora(model, params=13)
        with torch.no_grad():
            bank.v.normal_(0, 3.0, generator=torch.Generator().manual_seed(k))
        paths.append(tinylora.save_adapter(bank, str(out / f"{name}.safetensors")))
        tinylora.remove_tinylora(model)
    return paths


def served(tiny_folder, sevens_jsonl, adapters, tmp_path, requests, *extra):
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    out = tmp_path / "out.jsonl"
    serve.main(["--model", tiny_folder, "--adapters", *adapters, "--requests",
                str(tmp_path / "req.jsonl"), "--out", str(out), "--data", sevens_jsonl,
                "--max-new-tokens", "8", *extra])
    return [json.loads(x) for x in open(out)]


@pytest.mark.parametrize("temperature", ["0", "1"])
def test_a_mixed_batch_answers_each_request_as_its_adapter_alone(
        temperature, tiny_folder, sevens_jsonl, adapters, tmp_path):
    names = ["base", "terse", "chatty", "odd", "2", "0"]
    requests = [dict(adapter=a, question=q) for a in names for q in QUESTIONS]
    mixed = served(tiny_folder, sevens_jsonl, adapters, tmp_path, requests, "--batch-size", "7",
                   "--temperature", temperature)
    alone = served(tiny_folder, sevens_jsonl, adapters, tmp_path, requests, "--batch-size", "1",
                   "--temperature", temperature)
    assert mixed == alone
    by_adapter = {n: [r["reply"] for r in mixed if r["adapter"] == n] for n in names}
    assert len({tuple(v) for v in by_adapter.values()}) >= 4  # they do answer differently
    if temperature == "0":  # a name and its number are one adapter (sampled: each line its seed)
        assert by_adapter["chatty"] == by_adapter["2"] and by_adapter["base"] == by_adapter["0"]


@pytest.mark.parametrize("requests,why", [
    ([], "no requests in it"),
    ([dict(adapter="nobody", question="1 + 1?")], "line 1: needs 'adapter' .*terse, chatty, odd"),
    ([dict(adapter=4, question="1 + 1?")], r"line 1: needs 'adapter' .*or 0\.\.3"),
    ([dict(adapter="odd")], "line 1: .*one of 'question' or 'prompt'"),
    ([dict(adapter="odd", question="q", prompt="p")], "one of 'question' or 'prompt'"),
    ([dict(adapter="odd", prompt="")], "request 1: its prompt has 0 tokens"),
])
def test_a_bad_request_is_refused_in_one_line_and_nothing_is_written(
        requests, why, tiny_folder, sevens_jsonl, adapters, tmp_path):
    with pytest.raises(ValueError, match=why):
        served(tiny_folder, sevens_jsonl, adapters, tmp_path, requests)
    assert not (tmp_path / "out.jsonl").exists()


def test_the_replies_go_into_a_new_folder_and_a_folder_as_out_is_refused(
        tiny_folder, sevens_jsonl, adapters, tmp_path):
    (tmp_path / "req.jsonl").write_text(json.dumps(dict(adapter="terse", question="q")) + "\n")
    argv = ["--model", tiny_folder, "--adapters", *adapters, "--requests",
            str(tmp_path / "req.jsonl"), "--data", sevens_jsonl, "--max-new-tokens", "2", "--out"]
    serve.main(argv + [str(tmp_path / "new" / "out.jsonl")])
    assert len(open(tmp_path / "new" / "out.jsonl").readlines()) == 1
    with pytest.raises(ValueError, match="is a folder; name the replies file"):
        serve.main(argv + [str(tmp_path / "new")])


def test_bad_adapter_files_are_refused_in_one_line_naming_the_file(
        tiny_folder, sevens_jsonl, adapters, tmp_path):
    good = [dict(adapter="base", question="What is 2 + 5?")]
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(open(adapters[0], "rb").read()[:-9])
    for files, why in [([adapters[0], adapters[0]], "two files are named 'terse'"),
                       ([str(tmp_path / "gone.safetensors")], "gone.safetensors is not a readable"),
                       ([adapters[0], str(truncated)], "cut.safetensors is not a readable")]:
        with pytest.raises(ValueError, match=why):
            served(tiny_folder, sevens_jsonl, files, tmp_path, good)
        assert not (tmp_path / "out.jsonl").exists()


def test_check_alone_and_the_per_adapter_account(tiny_folder, sevens_jsonl, adapters, tmp_path,
                                                 capsys):
    requests = [dict(adapter=a, question=q, gold=7) for q in QUESTIONS for a in ("odd", "base")]
    served(tiny_folder, sevens_jsonl, adapters, tmp_path, requests, "--batch-size", "3",
           "--check-alone")
    out = capsys.readouterr().out
    assert "8 of 8 replies are the ones each adapter gives served alone" in out
    # a random model never writes '#### 7': strict 0 and nothing to copy
    assert "  odd: 4 requests, strict 0.0%, '####' not the equation's result 0.0%" in out
    assert "  base: 4 requests, strict 0.0%" in out


def test_the_per_adapter_account_by_hand():
    requests = [(1, dict(adapter="a", gold=5)), (0, dict(adapter="base", gold=5)),
                (1, dict(adapter="a", gold=4)), (0, dict(adapter="base", prompt="hi"))]
    rows = [dict(reply="2 + 3 = 5.\n#### 5", finished=True),
            dict(reply="2 + 3 = 5.\n#### 2", finished=True),
            dict(reply="1 + 3 = 4.\n#### 4", finished=False),  # cut off: not right under strict
            dict(reply="hello", finished=True)]
    assert serve.per_adapter(requests, rows) == (
        "  a: 2 requests, strict 50.0%, '####' not the equation's result 0.0%\n"
        "  base: 2 requests")  # one of base's requests has no gold: no accuracy


def test_the_example_is_the_first_question_whose_adapters_reply_differently():
    requests = [(1, dict(adapter="a", prompt="p1")), (0, dict(adapter="base", prompt="p2")),
                (0, dict(adapter="base", question="q1")), (1, dict(adapter="a", question="q1")),
                (0, dict(adapter="base", question="q2")), (1, dict(adapter="a", question="q2"))]
    rows = [dict(reply=r) for r in ("one", "another", "same", "same", "x", "y")]
    assert serve.example(requests, rows) == "e.g. 'q2'\n  base: 'x'\n  a: 'y'"
    assert serve.example(requests[:4], rows[:4]) == ""  # each asked once, or answered alike


@pytest.mark.slow
def test_vllm_multi_lora_answers_the_mixed_requests_as_hf_does(tiny_folder, sevens_jsonl, adapters,
                                                              tmp_path):
    """The comparison route: each adapter exported as its exact rank-r LoRA, one LoRARequest per
    request, up to 4 in one batch; fp32 greedy replies as HF's on the per-row forward."""
    vllm_or_skip()
    requests = [dict(adapter=a, question=q) for q in QUESTIONS
                for a in ("base", "terse", "chatty", "odd")]
    hf = served(tiny_folder, sevens_jsonl, adapters, tmp_path, requests, "--batch-size", "16")
    vllm = served(tiny_folder, sevens_jsonl, adapters, tmp_path, requests, "--engine", "vllm",
                  "--max-loras", "4")
    assert [r["reply"] for r in vllm] == [r["reply"] for r in hf]


@pytest.mark.slow
def test_the_serving_benchmark_times_every_engine_in_one_regime(tiny_folder, tmp_path, capsys):
    from harness import bench_serving
    vllm_or_skip()
    res = bench_serving.benchmark(tiny_folder, Ks=(1, 4), n=4, max_new=2, reps=3, max_loras=2,
                                  peft_Ks=(1, 4), out=str(tmp_path / "b.json"))
    got = {(r["engine"], r["K"]): r for r in res["rows"]}
    assert set(got) == {("HF base", 0), ("TinyLoRA mixed batch (HF)", 1),
                        ("TinyLoRA mixed batch (HF)", 4), ("one adapter after another (HF)", 1),
                        ("PEFT LoRA mixed batch (HF)", 1), ("PEFT LoRA mixed batch (HF)", 4),
                        ("vLLM base, plain engine", 0), ("vLLM base, LoRA engine", 0),
                        ("vLLM multi-LoRA", 1), ("vLLM multi-LoRA", 4)}
    assert all(len(r["seconds"]) == 3 and r["prompt_processing_included"] for r in got.values())
    assert got["TinyLoRA mixed batch (HF)", 4]["distinct_adapters_per_batch"] == 4
    assert got["vLLM multi-LoRA", 4]["distinct_adapters_per_batch"] == 2  # its 2 slots
    assert got["vLLM multi-LoRA", 4]["slot_rank"] == 8
    assert json.load(open(tmp_path / "b.json"))["rows"] and "| vLLM multi-LoRA | 4 |" in (
        capsys.readouterr().out)


@pytest.mark.slow
def test_the_readme_demo_gives_each_adapter_its_held_out_replies_from_the_sweep(smol_folder,
                                                                                tmp_path):
    """README's demo on real SmolLM2, the first 6 of its problems: every mixed-batch reply is the
    reply the sweep's held-out evaluation of that adapter (or the base) wrote for that problem."""
    demo = config.ROOT + "/docs/serve-demo"
    names = {"base": "base", "rl52-seed0": "rl-52-lr0.01-s0", "rl52-seed2": "rl-52-lr0.01-s2",
             "rl52-seed4": "rl-52-lr0.01-s4"}
    requests = read_jsonl(f"{demo}/requests.jsonl")[:24]
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    rows = serve.main(["--model", smol_folder, "--adapters",  # the GGUF's weights, saved once
                       *[f"{demo}/{n}.safetensors" for n in list(names)[1:]],
                       "--requests", str(tmp_path / "req.jsonl"), "--out", str(tmp_path / "o")])
    sweep = {(r["name"], r["split"]): r for r in
             read_jsonl(config.ROOT + "/docs/demo-search/52/results.jsonl")}
    questions = task.load_task("arith", "test", 1)[0]  # the sweep's held-out problems, in order
    where = {row["question"]: i for i, row in enumerate(questions)}
    expected = [sweep[(names[r["adapter"]], "test")]["verdicts"][where[r["question"]]]["reply"]
                for r in requests]
    assert [r["reply"] for r in rows] == expected


def test_lora_folders_write_each_named_adapter_as_its_own_lora_and_leave_bank_v_as_it_was(
        tiny_folder, tmp_path):
    from safetensors.torch import load_file
    model, _ = models.load_model(tiny_folder)
    bank = tinylora.apply_tinylora(model, params=13)
    with torch.no_grad():
        bank.v.fill_(0.5)
    vs = bench_serving.random_vs(3, bank.v.shape)
    folders = export.write_loras(bank, vs, [3, 1], str(tmp_path))
    assert list(folders) == [3, 1] and torch.equal(bank.v, torch.full_like(bank.v, 0.5))
    lora = {k: load_file(f"{folders[k]}/adapter_model.safetensors") for k in folders}
    assert all(not torch.equal(lora[3][n], lora[1][n]) for n in lora[3] if "lora_B" in n)
