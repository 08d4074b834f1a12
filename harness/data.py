"""
Data machinery for task.py: reading a user's JSONL file (each defect one ValueError with its line
number, never a traceback), and the CPU demo's task, --data arith and arith-transfer: a ± b in
GSM8K's row format, because SmolLM2-135M scores 0.5% strict on GSM8K (too sparse a reward for RL on
a CPU).

 - arith: all 800 problems a ± b with a, b in 1..20; a fixed 200 are held out ('test'), 600 train.
 - arith-transfer: arith's training problems (its shots, its validation split) and another test:
   200 problems with operands 21..60 in four other wordings per operation.
"""
import json
import random
import re

from task import extract_strict


def read_jsonl(path):
    """[(line number, object)] of a JSONL file; blank lines skipped; any defect: one ValueError."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        try:
            out += [(i, json.loads(line))] if line.strip() else []
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path} line {i}: not valid JSON ({str(e)[:80]})") from None
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def arith_rows(split, seed=0):
    """All 800 problems a ± b with a, b in 1..20; a fixed 200 are held out ('test'), 600 train."""
    probs = [(a, op, b) for a in range(1, 21) for b in range(1, 21) for op in "+-"]
    random.Random(seed).shuffle(probs)
    part = probs[:200] if split == "test" else probs[200:]
    return [row(f"What is {a} {op} {b}?", a, op, b) for a, op, b in part]


def row(question, a, op, b):
    c = a + b if op == "+" else a - b
    return dict(question=question, gold=float(c), answer=str(c),
                solution=f"{a} {op} {b} = {c}.\n#### {c}")


TRANSFER = {"+": ("What is the sum of {a} and {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.",
                  "{a} + {b} = ?"),
            "-": ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} take away {b}.",
                  "{a} - {b} = ?")}


def transfer_rows(n=200, seed=0):
    """n problems unlike arith's in phrasing and range, to test transfer: a ± b with a, b in 21..60
    (two-digit operands; arith's are 1..20), each in one of four other wordings per operation."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        a, b, op = rng.randint(21, 60), rng.randint(21, 60), rng.choice("+-")
        rows.append(row(rng.choice(TRANSFER[op]).format(a=a, b=b), a, op, b))
    return rows


# --data name -> rows of a split
ARITH = {"arith": arith_rows,
        "arith-transfer": lambda split: transfer_rows() if split == "test" else arith_rows(split)}


EQUATION = re.compile(r"(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)")


def equation_account(problems, replies):
    """What arithmetic replies hold beyond right and wrong (the CPU demo's account): the share whose
    '####' number differs from the result of the last equation 'a ± b = c' they wrote before it
    (the model copying a shot's answer), and the share whose equation's result is the problem's
    answer. problems: task rows; replies: their texts."""
    n = copied = right = 0
    for problem, reply in zip(problems, replies):
        found = EQUATION.findall(reply.split("####")[0])
        said = extract_strict(reply)
        n += 1
        if found:
            result = float(found[-1][3])
            copied += said is not None and said != result
            right += result == problem["gold"]
    return dict(n=n, copied=copied / max(n, 1), right_equations=right / max(n, 1))
