"""
The task: GSM8K (or small arithmetic) problems, the prompt, the answer extractors and the reward.

Shared by train_grpo.py and eval.py, so training and evaluation can never disagree on what is right.
Rows are {question, gold}. Run `pytest -q test_task.py` for its tests.

Chosen where the paper is silent:
 1. Reward = 1 only if the completion ended on its own (EOS) *and* the number after the last "####"
    equals the gold number (numeric compare). A prototype that rewarded cut-off completions learned
    never to stop.
 2. Local .jsonl files are read line by line with the json module (not `datasets`), so that a bad file
    is reported with its line number and never as a traceback; hub ids go through `datasets`.
 3. --data arith: a ± b with a, b in 1..20 and a two-shot prompt, because SmolLM2-135M scores 0.5% strict
    on GSM8K: too sparse a reward for RL on a CPU. 200 fixed problems are held out.
"""
import json
import math
import os
import random
import re

SUFFIX = ' Let\'s think step by step and output the final answer after "####".'
# The two shots disagree on the answer format on purpose: SmolLM2-135M copies the last shot's format, so
# its greedy replies never use '####' (5% of samples at T=1 do). Learning to follow the instruction is
# what 13 scalars can do; with two '####' shots it formats 100% and only its arithmetic (~40%) limits it.
ARITH_SHOTS = [("What is 15 - 6?", "15 - 6 = 9.\n#### 9"), ("What is 3 + 4?", "3 + 4 = 7. The answer is 7.")]

# -----------------------------------------------------------------------------
# Extractors and reward: pure functions that never raise on any string

NUM = r"-?[\d,]*\.?\d+"
STRICT_RE = re.compile(r"####\s*\$?\s*(" + NUM + ")")
NUM_RE = re.compile(NUM)


def parse_number(s):
    """'1,234' -> 1234.0, '$5' -> 5.0, '-3.50' -> -3.5; None if s holds no finite number."""
    if s is None:
        return None
    m = NUM_RE.search(s.replace("$", ""))
    if m is None:
        return None
    try:
        x = float(m.group(0).replace(",", ""))
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def extract_strict(text):
    """The number after the last '####' (the training reward's format), or None."""
    hits = STRICT_RE.findall(text)
    return parse_number(hits[-1]) if hits else None


def extract_flexible(text):
    """The last number anywhere in the text, or None."""
    hits = NUM_RE.findall(text.replace("$", ""))
    return parse_number(hits[-1]) if hits else None


def same_number(a, b):
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def reward(text, gold, finished):
    """1.0 iff the completion stopped on its own and its '####' answer equals gold, else 0.0."""
    return float(bool(finished) and same_number(extract_strict(text), gold))


def score(reply, gold, finished, n_tokens):
    """One problem's verdicts. strict = the training reward (the number after '####' is right and the
    reply stopped); hash_right = that number is right, stopped or not; flexible = the last number is."""
    return dict(strict=reward(reply, gold, finished) == 1.0,
                hash_right=same_number(extract_strict(reply), gold),
                flexible=same_number(extract_flexible(reply), gold),
                has_hash=extract_strict(reply) is not None,
                unparseable=extract_flexible(reply) is None,
                finished=bool(finished), n_tokens=n_tokens)


# -----------------------------------------------------------------------------
# Data: GSM8K from the hub, a .jsonl file or a folder; or the arithmetic task


def read_jsonl(path):
    """[(line number, object)] of a JSONL file; blank lines are skipped; any defect -> one ValueError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((i, json.loads(line)))
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path} line {i}: not valid JSON ({str(e)[:80]})") from None
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def gsm8k_row(ex, where):
    """{question, gold} from a GSM8K record {question, answer: '... #### N'}; a clear error otherwise."""
    q = ex.get("question") if isinstance(ex, dict) else None
    a = ex.get("answer") if isinstance(ex, dict) else None
    gold = extract_strict(a) if isinstance(a, str) else None
    if not isinstance(q, str) or not q.strip() or gold is None:
        raise ValueError(f"{where}: needs a 'question' and an 'answer' ending in '#### <number>', "
                         f"got {str(ex)[:120]}")
    return dict(question=q, gold=gold)


def load_gsm8k(spec, split):
    """`openai/gsm8k` through datasets (hub), a .jsonl file, or a folder holding {split}.jsonl."""
    if os.path.isdir(spec):
        spec = os.path.join(spec, f"{split}.jsonl")
        if not os.path.isfile(spec):
            raise ValueError(f"data folder {os.path.dirname(spec)} has no {split}.jsonl")
    if spec.endswith(".jsonl"):
        if not os.path.isfile(spec):
            raise ValueError(f"data file not found: {spec}")
        return [gsm8k_row(ex, f"{spec} line {i}") for i, ex in read_jsonl(spec)]
    import datasets
    try:
        ds = datasets.load_dataset(spec, "main", split=split)
    except (OSError, ValueError) as e:  # unknown dataset id, no network, unknown split
        raise ValueError(f"cannot load dataset {spec!r}: {str(e).strip().splitlines()[0]}") from None
    return [gsm8k_row(ex, f"{spec} [{split}] row {i}") for i, ex in enumerate(ds)]


def arith_rows(split, seed=0):
    """All 800 problems a ± b with a, b in 1..20; a fixed 200 are held out ('test'), the rest train."""
    probs = [(a, op, b) for a in range(1, 21) for b in range(1, 21) for op in "+-"]
    random.Random(seed).shuffle(probs)
    part = probs[:200] if split == "test" else probs[200:]
    return [dict(question=f"What is {a} {op} {b}?", gold=float(a + b if op == "+" else a - b)) for a, op, b in part]


def load_task(data, split):
    """(rows, few-shot examples) for --data arith | openai/gsm8k | file.jsonl | folder."""
    if data == "arith":
        return arith_rows(split), ARITH_SHOTS
    return load_gsm8k(data, split), []


# -----------------------------------------------------------------------------
# Prompt


def build_prompt(tok, question, shots=()):
    """The model's chat template, one user turn: question + the paper's suffix (shots as earlier turns)."""
    msgs = []
    for q, a in shots:
        msgs += [dict(role="user", content=q + SUFFIX), dict(role="assistant", content=a)]
    msgs.append(dict(role="user", content=question + SUFFIX))
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def prompt_ids(tok, rows, shots, max_prompt):
    """[(row, token ids)] of each row's prompt; prompts over max_prompt tokens are dropped (as verl)."""
    out = []
    for row in rows:
        ids = tok(build_prompt(tok, row["question"], shots), add_special_tokens=False)["input_ids"]
        if len(ids) <= max_prompt:
            out.append((row, ids))
    return out
