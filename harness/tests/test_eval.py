"""Specifications of eval.py: intervals, McNemar, the three scores, both backends end to end, an
adapter for another base refused. CPU only, no network."""
import json

import pytest
import torch

import eval as E
import task
import tinylora
from harness import config
from harness.tests.fixtures import (GSM8K_TEST, cli, need_shared, tiny_model,
                                    vllm_or_skip)


def test_wilson_hand_values():
    lo, hi = E.wilson(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)  # textbook value for 50/100
    lo, hi = E.wilson(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    assert E.wilson(10, 10)[1] == pytest.approx(1.0) and E.wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_on_known_tables():
    assert E.mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # = 0.03857
    assert E.mcnemar_exact(3, 3) == 1.0 and E.mcnemar_exact(0, 0) == 1.0
    assert E.mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def test_strict_flexible_split_on_a_table_of_replies():
    table = [  # reply, gold, finished -> strict, flexible, unparseable
        ("3 + 4 = 7\n#### 7", 7, True, True, True, False),
        ("3 + 4 = 7. The answer is 7.", 7, True, False, True, False),
        ("#### 7", 7, False, False, True, False),  # cut off: never strict
        ("#### 8 wait, 7", 7, True, False, True, False),
        ("#### 7, so 8 in total", 7, True, True, False, False),
        ("I don't know", 7, True, False, False, True),
    ]
    res = [task.score(r, dict(gold=g, answer=str(g)), f, 5) for r, g, f, *_ in table]
    assert [x["paper"] for x in res] == [True, False, True, False, True, False]  # stopped or not
    assert [x["strict"] for x in res] == [t[3] for t in table]
    assert [x["flexible"] for x in res] == [t[4] for t in table]
    assert [x["unparseable"] for x in res] == [t[5] for t in table]
    s = E.summarize(res)
    assert s["strict"]["correct"] == 2 and s["flexible"]["correct"] == 4 and s["unparseable"] == 1
    assert s["truncated"] == pytest.approx(1 / 6) and s["n"] == 6
    c = E.compare(res, [dict(x, strict=True) for x in res])
    assert (c["adapter_only"], c["base_only"], c["diff"]) == (4, 0, pytest.approx(4 / 6))


@pytest.mark.slow
def test_both_backends_give_the_same_greedy_replies_and_the_adapter_is_applied(
        tiny_folder, smol_tok, tmp_path, capsys):
    data = need_shared(GSM8K_TEST)
    vllm_or_skip()
    m = tiny_model("qwen2", tok=smol_tok, vocab=len(smol_tok))  # the same weights as tiny_folder
    bank = tinylora.apply_tinylora(m, params=7)
    with torch.no_grad():
        bank.v.fill_(2.0)
    adapter = tinylora.save_adapter(bank, str(tmp_path / "a.safetensors"))
    reports = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / f"{backend}.json"
        E.main(["--model", tiny_folder, "--data", data, "--limit", "4", "--backend", backend,
                "--max-new-tokens", "12", "--adapter", adapter, "--compare", "--out", str(out)])
        printed = capsys.readouterr().out
        assert "McNemar" in printed and "greedy" in printed
        reports[backend] = json.load(open(out))
    for k in ("base", "adapter"):
        hf = [x["reply"] for x in reports["hf"]["problems"][k]]
        vl = [x["reply"] for x in reports["vllm"]["problems"][k]]
        assert hf == vl and len(hf) == 4
    # v = 2 changes the replies
    assert reports["hf"]["problems"]["base"] != reports["hf"]["problems"]["adapter"]
    assert reports["hf"]["models"]["base"]["n"] == 4
    assert "ci95" in reports["hf"]["models"]["base"]["strict"]


def test_an_adapter_for_another_model_or_a_missing_one_is_refused(tiny_folder, tmp_path):
    bank = tinylora.apply_tinylora(tiny_model("qwen2", vocab=49152, seed=5), params=7)
    adapter = tinylora.save_adapter(bank, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="different base weights"):
        E.main(["--model", tiny_folder, "--data", "arith", "--limit", "2", "--backend", "hf",
                "--adapter", adapter, "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(ValueError, match="adapter file not found"):
        config.eval_args(["--model", tiny_folder, "--adapter", str(tmp_path / "nope.safetensors")])
    with pytest.raises(ValueError, match="--compare needs --adapter"):
        config.eval_args(["--model", tiny_folder, "--compare"])


def test_the_default_7b_model_without_a_gpu_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no GPU here.*--device cpu"):
        config.eval_args(["--limit", "5"])


def test_the_merged_bf16_route_scores_what_the_paper_scored(smol_tok, tmp_path):
    """--route merged-bf16 gives the replies of the model whose weights are W0 + ΔW merged in fp32
    and cast once to bf16 (the fork's validation), here a base on the bf16 grid as a bf16
    checkpoint is; --route both reports the exact route beside it and compares the two."""
    from harness import export
    m = tiny_model("qwen2", tok=smol_tok, vocab=len(smol_tok)).to(torch.bfloat16).float()
    m.generation_config.eos_token_id = smol_tok.eos_token_id
    m.save_pretrained(tmp_path / "base")
    smol_tok.save_pretrained(tmp_path / "base")
    bank = tinylora.apply_tinylora(m, params=7)
    with torch.no_grad():
        bank.v.fill_(2.0)
    adapter = tinylora.save_adapter(bank, str(tmp_path / "a.safetensors"))
    export.write_merged(m, smol_tok, bank, str(tmp_path / "merged"), torch.bfloat16)
    argv = ["--data", "arith", "--limit", "6", "--backend", "hf", "--dtype", "float32",
            "--max-new-tokens", "8"]
    report = E.main(["--model", str(tmp_path / "base"), *argv, "--adapter", adapter, "--route",
                     "both", "--out", str(tmp_path / "r.json")])
    paper = E.main(["--model", str(tmp_path / "merged"), *argv, "--out", str(tmp_path / "m.json")])
    assert ([x["reply"] for x in report["problems"]["merged-bf16"]]
            == [x["reply"] for x in paper["problems"]["base"]])
    assert list(report["compare"]) == ["adapter vs merged-bf16"] and len(report["models"]) == 2


# ---- --suite math: Table 2's six benchmarks -----------------------------------------------------

SIMPLERL_ROWS = {  # two rows of each benchmark in SimpleRL's evaluation layout (its own fields)
    "gsm8k": [dict(question="Janet has 3 ducks and buys 4. How many?", answer="3+4=7\n#### 7"),
              dict(question="2 boxes of 1,000?", answer="2*1000\n#### 2,000")],
    "math500": [dict(problem="Convert $(0,3)$ to polar.",
                     solution="... $\\boxed{(3,\\frac{\\pi}{2})}$",
                     answer="\\left( 3, \\frac{\\pi}{2} \\right)"),
                dict(problem="What is $1+1$?", solution="$\\boxed{2}$", answer="2")],
    "minerva_math": [dict(problem="Find s.", solution="so $s=\\boxed{1.6}$ cm."),
                     dict(problem="Find t.", solution="Final answer: \\boxed{3 \\times 10^{8}}")],
    "olympiadbench": [dict(question="How many moves?", final_answer=["$2$"]),
                      dict(question="Find x.", final_answer=["$\\frac{1}{2}$"])],
    "aime24": [dict(problem="Find the walk's minutes.", answer="204"),
               dict(problem="Find N.", answer="025")],
    "amc23": [dict(question="How many miles from A?", answer=27.0),
              dict(question="What is y?", answer=1.5)]}
GOLDS = {"gsm8k": ["7", "2000"], "math500": ["\\left( 3, \\frac{\\pi}{2} \\right)", "2"],
         "minerva_math": ["1.6", "3 \\times 10^{8}"], "olympiadbench": ["2", "\\frac{1}{2}"],
         "aime24": ["204", "025"], "amc23": ["27", "1.5"]}


def simplerl_folder(root, drop=None, rows=SIMPLERL_ROWS):
    for name, examples in rows.items():
        if name != drop:
            (root / name).mkdir(parents=True)
            (root / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                            for r in examples))
    return str(root)


def test_each_benchmark_gold_is_read_as_simplerls_parser_reads_it(tmp_path):
    from harness import data
    where = simplerl_folder(tmp_path)
    assert {n: [p["answer"] for p in data.benchmark_problems(n, where)]
            for n in data.BENCHMARKS} == GOLDS


def test_the_math_suite_scores_six_benchmarks_in_table_2s_layout_from_one_generator(
        tiny_folder, tmp_path, capsys, monkeypatch):
    import rollout
    built = []
    make = rollout.make_generator
    monkeypatch.setattr(rollout, "make_generator", lambda *a, **k: built.append(1) or make(*a, **k))
    out = tmp_path / "eval.json"
    res = E.main(["--suite", "math", "--data", simplerl_folder(tmp_path / "b"), "--model",
                  tiny_folder, "--backend", "hf", "--max-new-tokens", "4", "--out", str(out)])
    assert len(built) == 1 and list(res["benchmarks"]) == list(E.SUITES["math"])
    assert all(b["models"]["base"]["n"] == 2 and set(b["models"]["base"]) >= set(E.MATH_METRICS)
               for b in res["benchmarks"].values())
    assert [r["gold"] for r in res["benchmarks"]["amc23"]["problems"]["base"]] == ["27", "1.5"]
    assert res["protocol"]["max_new_tokens"] == 4 and json.load(open(out))["benchmarks"]
    printed = capsys.readouterr().out
    assert "gsm8k" in printed and "amc23" in printed and "average" in printed


@pytest.mark.parametrize("argv,why", [
    (["--suite", "maths"], "--suite 'maths' is not a suite (known: math)"),
    (["--suite", "math", "--data", "nowhere.jsonl"], "'nowhere.jsonl' is not a folder"),
    (["--suite", "math", "--samples", "0"], "--samples must be >= 1, got 0")])
def test_a_bad_suite_flag_is_one_line_before_anything_loads(argv, why, tiny_folder):
    with pytest.raises(ValueError) as e:
        E.main(argv + ["--model", tiny_folder])
    assert why in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("drop,bad,why", [
    ("amc23", None, "amc23/test.jsonl: no such file"),
    (None, dict(question="No gold?"), "aime24/test.jsonl line 3: no gold answer")])
def test_a_missing_benchmark_file_or_gold_is_one_line_and_nothing_is_written(
        drop, bad, why, tiny_folder, tmp_path):
    rows = {n: r + ([bad] if bad and n == "aime24" else []) for n, r in SIMPLERL_ROWS.items()}
    out = tmp_path / "eval.json"
    with pytest.raises(ValueError) as e:
        E.main(["--suite", "math", "--data", simplerl_folder(tmp_path / "b", drop, rows),
                "--model", tiny_folder, "--backend", "hf", "--max-new-tokens", "2", "--out",
                str(out)])
    assert why in str(e.value) and "\n" not in str(e.value) and not out.exists()


@pytest.mark.slow
def test_the_math_suite_runs_on_smollm2_from_the_command_line(smol_folder, tmp_path):
    p = cli("eval.py", "--suite", "math", "--data", simplerl_folder(tmp_path / "b"), "--model",
            smol_folder, "--backend", "hf", "--max-new-tokens", "24", "--out",
            str(tmp_path / "m.json"))  # HF: no vLLM start (both backends: the test above)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "math-verify" in p.stdout and "olympiadbench" in p.stdout and "average" in p.stdout
    report = json.load(open(tmp_path / "m.json"))
    assert list(report["benchmarks"]) == list(E.SUITES["math"])
