"""Specifications of task.py: extractors, rewards, loaders (fuzzed: no data file reaches a
traceback), the prompt, the schedules. CPU only, no network."""
import copy
import json
import os

import pytest
from hypothesis import given, settings, strategies as st

import task
from harness.data import arith_rows
from harness.tests.fixtures import GSM8K_TEST, GSM8K_TRAIN, need_shared


# ---- rewards -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,strict,flex", [
    ("so 9 + 9 = 18\n#### 18", 18, 18),
    ("#### 18.0", 18, 18),
    ("#### $1,234", 1234, 1234),
    ("####-5", -5, -5),
    ("#### 3.50 dollars", 3.5, 3.5),
    ("first #### 7 then #### 8", 8, 8),  # the last '####' counts
    ("The answer is 42.", None, 42),
    ("It costs $5", None, 5),
    ("#### 1,000,000.", 1e6, 1e6),
    ("no number here", None, None),
    ("####", None, None),
    ("", None, None),
    ("#### 12 apples, 3 left", 12, 3),
])
def test_extraction_table(text, strict, flex):
    assert task.extract_strict(text) == strict
    assert task.extract_flexible(text) == flex


# a task row's two golds: the number, and verl's ground-truth string
P18 = dict(gold=18.0, answer="18")


def test_reward_needs_the_number_and_a_finished_completion():
    assert task.reward("#### 18", P18, True, "strict") == 1.0
    assert task.reward("#### 18", P18, False, "strict") == 0.0  # cut off: no reward
    assert task.reward("#### 17", P18, True, "strict") == 0.0
    assert task.reward("The answer is 18", P18, True, "strict") == 0.0  # the format counts
    assert task.same_number(0.1 + 0.2, 0.3) and not task.same_number(None, 3.0)
    assert not task.same_number(2.0, 3.0)
    with pytest.raises(ValueError, match="unknown reward 'exact'"):
        task.reward("#### 18", P18, True, "exact")


# gold 18, or 1234 where the reply says so
@pytest.mark.parametrize("reply,finished,paper,strict", [
    ("so 9 + 9 = 18\n#### 18", True, 1, 1),
    ("#### 18.", True, 0, 1),  # verl compares strings: '18.' != '18'
    ("#### 18.00", True, 0, 1),
    ("#### 1,234", True, 1, 1),  # commas dropped on both sides
    ("#### $18", True, 0, 1),  # verl's pattern wants a digit, '-', '.' or ',' right after '#### '
    ("####18", True, 0, 1),  # ... and exactly one space
    ("####  18", True, 0, 1),
    ("#### 18", False, 1, 0),  # cut off at the token limit: verl does not care, strict does
    ("#### 17 no wait #### 18", True, 1, 1),  # both take the last '####'
    ("#### 18 no wait #### 17", True, 0, 0),
    ("#### 18" + " and so on" * 30, True, 0, 1),  # verl reads only the last 300 characters
    ("The answer is 18.", True, 0, 0),
    ("#### -18", True, 0, 0),
])
def test_paper_and_strict_rewards_on_the_replies_where_they_disagree(
        reply, finished, paper, strict):
    problem = dict(gold=1234.0, answer="1234") if "1,234" in reply else P18
    assert task.reward(reply, problem, finished, "paper") == paper
    assert task.reward(reply, problem, finished, "strict") == strict


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789#$,.- \nabc")), max_size=60)
       | st.text(max_size=60))
def test_extractors_never_raise(text):
    for f in (task.extract_strict, task.extract_flexible, task.parse_number):
        out = f(text)
        assert out is None or isinstance(out, float)
    assert task.paper_answer(text) is None or isinstance(task.paper_answer(text), str)
    row = dict(gold=3.0, answer="3")
    assert all(task.reward(text, row, True, k) in (0.0, 1.0) for k in ("paper", "strict", "math"))


def test_gsm8k_golds_parse_and_bad_rows_are_named(tmp_path):
    rows = task.load_problems(need_shared(GSM8K_TEST), "test")
    assert len(rows) == 1319 and all(r["gold"] == int(r["gold"]) for r in rows)
    assert rows[0]["gold"] == 18.0 and rows[0]["answer"] == "18"  # Janet's ducks
    assert all(float(r["answer"]) == r["gold"] and "," not in r["answer"] for r in rows)  # verl's
    assert len(task.load_problems(os.path.dirname(GSM8K_TRAIN), "train")) == 7473
    bad = tmp_path / "bad.jsonl"
    rows = [dict(question="q", answer="#### 3"), dict(question="q", answer="no")]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="bad.jsonl line 2: needs"):
        task.load_problems(str(bad), "train")
    with pytest.raises(ValueError, match="not found"):
        task.load_problems(str(tmp_path / "missing.jsonl"), "train")


def test_shots_and_validation_come_from_train_and_are_never_trained_on():
    train, shots = task.load_task("arith", "train", shots=3, val=50)
    val, shots2 = task.load_task("arith", "val", shots=3, val=50)
    test, shots3 = task.load_task("arith", "test", shots=3)
    full = arith_rows("train")
    assert shots == shots2 == shots3 == [(r["question"], r["solution"]) for r in full[:3]]
    assert train + val == full[3:] and len(val) == 50
    assert not {q for q, _ in shots} & {r["question"] for r in train + val + test}
    assert task.load_task("arith", "train")[1] == [(r["question"], r["solution"]) for r in full[:2]]
    assert task.load_task(need_shared(GSM8K_TEST), "test")[1] == []  # GSM8K: the paper's prompt
    with pytest.raises(ValueError, match="leave nothing"):
        task.load_task("arith", "train", shots=2, val=598)
    with pytest.raises(ValueError, match="unknown split"):
        task.load_task("arith", "dev")


def test_gsm8k_solution_drops_calculator_annotations():
    problem = task.gsm8k_problem({"question": "q?",
                                  "answer": "48/2 = <<48/2=24>>24 clips.\n#### 24"}, "x")
    assert problem == dict(question="q?", gold=24.0, answer="24",
                           solution="48/2 = 24 clips.\n#### 24")


def test_prompt_is_the_shots_as_earlier_turns_in_one_format(smol_tok):
    shots = task.load_task("arith", "test")[1]
    p = task.build_prompt(smol_tok, "What is 2 + 2?", shots)
    assert p.count("<|im_start|>user") == 3 and p.count("<|im_start|>assistant") == 3
    assert p.count(task.SUFFIX) == 3
    assert all(a in p and task.extract_strict(a) == eval(q[8:-1]) for q, a in shots)  # solved
    assert p.index(shots[1][1]) < p.index("What is 2 + 2?")
    assert p.endswith("<|im_start|>assistant\n")
    zero = task.build_prompt(smol_tok, "What is 2 + 2?", [])  # the paper's prompt
    assert zero.count("<|im_start|>user") == 1 and "What is 2 + 2?" + task.SUFFIX in zero


# ---- loaders: every bad file is one ValueError naming it, never a traceback ----------------------

def test_jsonl_loader_reports_the_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "q", "answer": "#### 3"}\n\n'
                 '{"question": "q2", "answer": "x #### 4"}\n')
    assert task.load_problems(str(p), "train") == [
        dict(question="q", gold=3.0, answer="3", solution="#### 3"),
        dict(question="q2", gold=4.0, answer="4", solution="x #### 4")]
    for content, msg in [("", "no rows"), ('{"question": "q", "answer": "#### 1"}\n{oops\n',
                                           "line 2: not valid JSON"),
                         ('{"q": 1}\n', "line 1: needs"),
                         ('{"question": "", "answer": "#### 1"}\n', "line 1: needs"),
                         ('{"question": "q", "answer": "#### ' + "9" * 400 + '"}\n',
                          "line 1: needs")]:
        p.write_text(content)
        with pytest.raises(ValueError, match=msg):
            task.load_problems(str(p), "train")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | st.lists(
    st.one_of(st.just(""), st.just("{"), st.just("null"), st.just("[1, 2]"),
              st.just('{"question": 3}'),
              st.builds(lambda q, a: json.dumps(dict(question=q, answer=a)), st.text(max_size=8),
                        st.text(alphabet="0123456789#.,-e$ x", max_size=12)),
              st.builds(lambda n: json.dumps(dict(question="q", answer=f"#### {n}")),
                        st.integers(-10 ** 400, 10 ** 400))),
    max_size=5).map(lambda lines: "\n".join(lines).encode()))
def test_no_data_file_reaches_a_traceback(tmp_path_factory, content):
    p = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    p.write_bytes(content)
    try:
        rows = task.load_problems(str(p), "train")
    except ValueError as e:
        assert str(p) in str(e) and "\n" not in str(e)
    else:
        assert rows
        assert all(isinstance(r["question"], str) and isinstance(r["gold"], float) for r in rows)


# ---- schedules: any step's batch and learning rate follow from (seed, step) ----------------------

def test_each_epoch_is_a_permutation_that_depends_only_on_seed_and_step():
    items = list(range(10))
    epoch0 = [x for s in range(5) for x in task.batch_at(items, s, 2, 0)]
    assert sorted(epoch0) == items and epoch0 != items  # a permutation, not the file order
    assert task.batch_at(items, 7, 2, 0) == task.batch_at(items, 7, 2, 0)
    assert task.batch_at(items, 7, 2, 0) != task.batch_at(items, 7, 2, 1)
    assert sorted(x for s in range(5, 10) for x in task.batch_at(items, s, 2, 0)) == items


def test_without_shuffle_every_epoch_is_the_files_order_and_a_short_last_batch_is_dropped():
    items = list(range(11))  # 5 batches of 2 per epoch; item 10 is never drawn (verl's drop_last)
    assert [task.batch_at(items, s, 2, 0, shuffle=False) for s in range(6)] == [
        [0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [0, 1]]


def test_the_learning_rate_warms_up_from_zero_over_verls_steps_then_stays_constant():
    # the fork's run: 348 rollout steps, lr_warmup_steps_ratio 0.05: int(17.4) = 17 steps
    lrs = [task.lr_at(s, 348, 1.0, 0.05) for s in (0, 1, 16, 17, 300)]
    assert lrs == [0.0, 1 / 17, 16 / 17, 1.0, 1.0]
    assert task.lr_at(0, 10, 1.0, 0.0) == 1.0 and task.lr_at(0, 10, 1.0, 0.05) == 1.0  # int(0.5)


# ---- the MATH recipe's data and prompt --------------------------------------------------------

QWEN25_TEMPLATE = (  # Qwen2.5-Instruct's chat template without tools (its tokenizer_config.json)
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'system' and "
    "not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_the_qwen_boxed_prompt_on_a_qwen2_template_is_simplerls_text_exactly(smol_tok):
    """SimpleRL-Zoo's qwen-boxed template (examples/simplelr_math_eval/utils.py), once: the
    question is wrapped by the chat template alone, never by a stored template as well."""
    tok = copy.deepcopy(smol_tok)
    tok.chat_template = QWEN25_TEMPLATE
    q = "What is $\\frac{1}{2} + \\frac{1}{3}$?"
    want = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"{q}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
            "<|im_end|>\n<|im_start|>assistant\n")
    assert task.build_prompt(tok, q, [], "qwen-boxed") == want
    default = task.build_prompt(tok, q, [], "gsm8k")  # the GSM8K recipe keeps Qwen's own system
    assert "You are Qwen" in default and default.count("<|im_start|>") == 3


def test_simplerl_rows_become_problems_and_rows_without_a_gold_answer_are_skipped(tmp_path,
                                                                                   capsys):
    rows = [dict(question="What is $1+1$?", gt_answer="2", level="Level 3"),
            dict(question="Simplify $\\frac{2}{4}$.", gt_answer="\\frac{1}{2}"),
            dict(question="No gold here.", gt_answer=None),
            dict(question="Nor here.", gt_answer="")]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = task.load_problems(str(path), "train")
    assert [p["answer"] for p in problems] == ["2", "\\frac{1}{2}"]
    assert problems[0]["gold"] == 2.0 and problems[1]["gold"] is None
    assert task.reward(problems[1]["solution"], problems[1], True, "math") == 1.0  # its own box
    assert "2 rows without a gold answer (gt_answer) skipped" in capsys.readouterr().out
    import datasets
    datasets.Dataset.from_list(rows[:2]).to_parquet(str(tmp_path / "train.parquet"))
    assert task.load_problems(str(tmp_path / "train.parquet"), "train") == problems
    path.unlink()  # a folder: {split}.parquet when there is no .jsonl
    assert task.load_problems(str(tmp_path), "train") == problems


def test_a_parquet_without_the_question_column_is_refused_naming_the_file_and_field(tmp_path):
    import datasets
    bad = tmp_path / "train.parquet"
    datasets.Dataset.from_list([dict(problem="1+1?", gt_answer="2")]).to_parquet(str(bad))
    with pytest.raises(ValueError) as e:
        task.load_problems(str(bad), "train")
    assert str(e.value).startswith(f"{bad} row 1: needs a 'question'") and "\n" not in str(e.value)
