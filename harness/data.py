"""
The CPU demo's task for task.py, --data arith and arith-transfer: a ± b as GSM8K-format problems,
because SmolLM2-135M scores 0.5% strict on GSM8K (too sparse a reward for RL on a CPU).

 - arith: all 800 problems a ± b with a, b in 1..20; a fixed 200 are held out ('test'), 600 train.
 - arith-transfer: arith's training problems (its shots, its validation split) and another test:
   200 problems with operands 21..60 in four other wordings per operation.
"""
import random


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
