"""Specifications of harness/data.py: the CPU demo's arithmetic and its transfer set (a user's
JSONL files are tested through task.py's loader, in test_task.py)."""
import re

import task
from harness import account, data


def test_arith_split_is_deterministic_and_disjoint():
    train, test = data.arith_rows("train"), data.arith_rows("test")
    assert len(train) == 600 and len(test) == 200
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert data.arith_rows("test") == test
    assert all(eval(r["question"][8:-1]) == r["gold"] for r in test)
    assert all(task.extract_strict(r["solution"]) == r["gold"] for r in train + test)


def test_transfer_set_differs_in_range_and_wording_and_keeps_arith_shots():
    rows, shots = task.load_task("arith-transfer", "test", shots=2)
    arith = data.arith_rows("test") + data.arith_rows("train")
    assert len(rows) == 200 and rows == data.transfer_rows()
    assert shots == task.load_task("arith", "test")[1]
    same = task.load_task("arith", "train", 2, 100)
    assert task.load_task("arith-transfer", "train", 2, 100) == same
    for r in rows:
        a, b = map(int, re.findall(r"\d+", r["question"]))
        a, b = (b, a) if r["question"].startswith("Subtract") else (a, b)  # "Subtract b from a"
        op = "+" if any(w in r["question"] for w in ("sum", "Add", "plus", "+")) else "-"
        assert 21 <= a <= 60 and 21 <= b <= 60
        assert r["gold"] == (a + b if op == "+" else a - b) == float(r["answer"])
    assert not {r["question"] for r in rows} & {r["question"] for r in arith}
    wordings = {r["question"].split()[0] for r in rows}
    assert wordings >= {"What", "Add", "Subtract", "Compute"}


def test_equation_account_counts_copied_answers_and_right_equations_by_hand():
    problems = [dict(gold=g) for g in (5, 5, 5, 5, -1, 4, 9)]
    replies = ["2 + 3 = 5.\n#### 5",          # right equation, reports it
               "2 + 3 = 5.\n#### 2",          # right equation, copies another number
               "2 + 3 = 6.\n#### 6",          # wrong equation, reports it
               "#### 5",                      # no equation: neither
               "3 - 4 = -1.\n#### 7",         # a negative result, copied over
               "#### 4\n1 + 3 = 4",           # the equation after '####' does not count
               "1 + 1 = 2, then 4 + 5 = 9."]  # the last equation is the one; no '####': not copied
    assert account.equation_account(problems, replies) == dict(n=7, copied=2 / 7,
                                                            right_equations=4 / 7)
