"""
Where task.py's problems come from: a user's file or folder (JSONL or parquet) or the hub, read with
each defect one line naming the file and row; SimpleRL-Zoo's MATH training data and the six
benchmarks of the paper's Table 2 (SimpleRL's evaluation layout, or their hub copies); and the
problems this project generates for a CPU, because SmolLM2-135M scores 0.5% strict on GSM8K (too
sparse a reward for RL on a CPU):
 - arith: all 800 problems a ± b with a, b in 1..20; a fixed 200 are held out ('test'), 600 train.
 - arith-transfer: arith's training problems (its shots, its validation split) and another test:
   200 problems with operands 21..60 in four other wordings per operation.
 - fractions: MATH-style problems with \\boxed{} solutions (sums and products of two fractions, in
   lowest terms), for the MATH recipe's CPU preset; 300 train, 100 test.
"""
import os
import random
from fractions import Fraction

from harness.files import read_jsonl
from harness.mathnorm import qwen_extract

SIMPLERL = "hkust-nlp/SimpleRL-Zoo-Data"  # its simplelr_qwen_level3to5: MATH levels 3-5, 8,523
BENCHMARKS = {  # Table 2's six (SimpleRL's eval names): hub id, config, split
    "gsm8k": ("openai/gsm8k", "main", "test"), "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    "minerva_math": ("math-ai/minervamath", None, "test"),
    "olympiadbench": ("math-ai/olympiadbench", None, "test"),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train"), "amc23": ("math-ai/amc23", None, "test")}


# ---- Reading records ----------------------------------------------------------------------
def read_records(spec, split):
    """[(where, record)] of a split: a .jsonl or .parquet file (every split), a folder holding
    {split}.jsonl or .parquet, or a hub dataset (SimpleRL's: its simplelr_qwen_level3to5)."""
    if os.path.isdir(spec):
        found = [os.path.join(spec, f"{split}.{ext}") for ext in ("jsonl", "parquet")]
        if not any(os.path.isfile(f) for f in found):
            raise ValueError(f"data folder {spec} has no {split}.jsonl or {split}.parquet")
        spec = next(f for f in found if os.path.isfile(f))
    if spec.endswith((".jsonl", ".parquet")) and not os.path.isfile(spec):
        raise ValueError(f"data file not found: {spec}")
    if spec.endswith(".jsonl"):
        records = [(f"{spec} line {i}", ex) for i, ex in read_jsonl(spec, with_lines=True)]
    else:
        records = [(f"{spec} row {i}", ex) for i, ex in enumerate(hub_or_parquet(spec, split), 1)]
    if not records:
        raise ValueError(f"{spec}: no rows")
    return records


def hub_or_parquet(spec, split, config=None):
    """A parquet file's rows, or a hub dataset's split, through datasets; a clear ValueError."""
    import datasets
    if spec.endswith(".parquet"):
        kw = dict(path="parquet", data_files=spec, split="train")
    elif spec == SIMPLERL:
        kw = dict(path=spec, data_files={split: f"simplelr_qwen_level3to5/{split}.parquet"},
                  split=split)
    else:
        kw = dict(path=spec, name=config or ("main" if spec == "openai/gsm8k" else None),
                  split=split)
    try:
        return datasets.load_dataset(**kw)
    except (OSError, ValueError) as e:  # unknown dataset id, no network, unknown split
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"cannot load dataset {spec!r}: {first}") from None


# ---- MATH: SimpleRL's training data and Table 2's benchmarks -----------------------------------
def math_problem(question, answer, where):
    """{question, gold (a number, else None), answer (the gold string), solution} of a MATH row."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: needs a 'question' (or 'problem') text, got {question!r:.80}")
    try:
        gold = float(answer)
    except ValueError:
        gold = None
    return dict(question=question, gold=gold, answer=answer,
                solution=f"The final answer is $\\boxed{{{answer}}}$.")


def math_problems(records, spec):
    """Problems of SimpleRL's schema (question, gt_answer); rows without a gold answer are skipped
    and counted in one console line."""
    out = [math_problem(ex.get("question"), str(ex["gt_answer"]), where) for where, ex in records
           if ex.get("gt_answer") not in (None, "")]
    if len(out) < len(records):
        print(f"{spec}: {len(records) - len(out)} rows without a gold answer (gt_answer) skipped")
    return out


def benchmark_gold(ex):
    """A benchmark row's gold answer as SimpleRL's parser reads it: GSM8K's after '####',
    OlympiadBench's final_answer[0] less '$', an 'answer' field (AMC's 27.0 as 27), else the
    answer Qwen-Math's extraction finds in the 'solution' (Minerva); None without one."""
    answer, final = ex.get("answer"), ex.get("final_answer")
    if final:
        return str(final[0] if isinstance(final, list) else final).strip("$")
    if isinstance(answer, str) and "####" in answer:
        return answer.split("####")[-1].strip().replace(",", "")
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    if answer not in (None, ""):
        return str(answer)
    return qwen_extract(ex["solution"]) or None if ex.get("solution") else None


def benchmark_problems(name, where):
    """One benchmark's problems, from where/<name>/test.jsonl (SimpleRL's layout) or the hub."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    if where == "hub":
        hub, config, split = BENCHMARKS[name]
        records = [(f"{hub} row {i}", ex)
                   for i, ex in enumerate(hub_or_parquet(hub, split, config), 1)]
    else:
        path = os.path.join(where, name, "test.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file (--suite math reads <benchmark>/test.jsonl)")
        records = read_records(path, "test")
    out = []
    for at, ex in records:
        gold = benchmark_gold(ex)
        if gold is None:
            raise ValueError(f"{at}: no gold answer (answer, final_answer or a boxed solution)")
        out.append(math_problem(ex.get("question") or ex.get("problem"), gold, at))
    return out


# ---- Generated for a CPU ------------------------------------------------------------------
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


def tex(f):
    """A fraction in LaTeX: \\frac{p}{q}, or its integer."""
    return str(f.numerator) if f.denominator == 1 else f"\\frac{{{f.numerator}}}{{{f.denominator}}}"


def fraction_problems(split, seed=0):
    """300 train / 100 test distinct problems: the sum or product of two fractions with
    denominators 2..9, the answer in lowest terms, the solution ending in \\boxed{}."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < 400:
        a, b = (Fraction(rng.randint(1, 9), rng.randint(2, 9)) for _ in range(2))
        op, sign = rng.choice([("+", "+"), ("×", "\\times")])
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        c, expr = a + b if op == "+" else a * b, f"{tex(a)} {sign} {tex(b)}"
        problem = math_problem(f"What is ${expr}$? Express your answer as a common fraction in "
                               "lowest terms.", tex(c), "fractions")
        problem["solution"] = f"${expr} = {tex(c)}$, so the answer is $\\boxed{{{tex(c)}}}$."
        out.append(problem)
    return out[300:] if split == "test" else out[:300]


# --data name -> a split's problems, generated
SYNTHETIC = {"arith": arith_rows,
             "arith-transfer": lambda split: transfer_rows() if split == "test"
             else arith_rows(split),
             "fractions": fraction_problems}
