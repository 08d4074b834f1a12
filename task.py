"""
The task: GSM8K or MATH problems, the prompt, the answer extractors and the rewards, and the
schedules (each step's batch and learning rate), shared by train_grpo.py and eval.py so that
training and evaluation never disagree. A problem: {question, gold, answer, solution}. Where the
paper is silent:
 1. The rewards (--reward). paper: verl's GSM8K rule, which the paper trained and scored with (the
    last "#### N" in the last 300 characters string-equals the gold; cut-off replies count). strict:
    the reply stopped (EOS) *and* its last "####" number equals the gold (a prototype paid for
    cut-off replies learned never to stop). math: verl's MATH rule, the fork's (the last \boxed{},
    Hendrycks' normalisation, string equality); math-verify: verl's Math-Verify rule.
 2. The prompt: the few-shot chat a user would write, the train split's first K solved problems as
    earlier turns, then the question, each with the paper's suffix (--prompt gsm8k; K = 0 for
    GSM8K), or SimpleRL-Zoo's system message and boxed suffix (qwen-boxed, the MATH recipe's).
 3. A validation split (--val N) is the last N training problems, so learning rates are never
    chosen on the held-out split; shots and validation problems are never trained on.
 4. --data arith | arith-transfer | fractions: problems generated for a CPU (harness/data.py),
    because SmolLM2-135M scores 0.5% strict on GSM8K: too sparse a reward for RL on a CPU.
"""
import math
import random
import re

from harness import data, mathnorm

SUFFIX = ' Let\'s think step by step and output the final answer after "####".'
PROMPTS = {  # name: (the system message, None: the chat template's own; what follows the question)
    "gsm8k": (None, SUFFIX),  # verl's GSM8K preprocessing: the paper's GSM8K recipe
    "qwen-boxed": ("You are a helpful assistant.",  # SimpleRL-Zoo's: the MATH recipe
                   "\nPlease reason step by step, and put your final answer within \\boxed{}.")}
REWARDS = ("paper", "strict", "math", "math-verify")

# ---- Extractors and rewards: pure functions that never raise on any string -------------------
NUM = r"-?[\d,]*\.?\d+"
STRICT_RE, NUM_RE = re.compile(r"####\s*\$?\s*(" + NUM + ")"), re.compile(NUM)
PAPER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")  # verl/utils/reward_score/gsm8k.py

def parse_number(s):
    """'1,234' -> 1234.0, '$5' -> 5.0, '-3.50' -> -3.5; None if s holds no finite number."""
    m = NUM_RE.search(s.replace("$", "")) if s is not None else None
    x = float(m.group(0).replace(",", "")) if m else None  # NUM less its commas is always a float
    return x if x is not None and math.isfinite(x) else None

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

def paper_answer(text):
    """verl's GSM8K extraction (as in the author's fork): the last '#### N' (one space, no '$') in
    the text's last 300 characters, N's commas removed, a string (verl also drops '$', which its
    pattern never captures)."""
    hits = PAPER_RE.findall(text[-300:])
    return hits[-1].replace(",", "") if hits else None

def reward(text, problem, finished, rule):
    """1.0 or 0.0 for a reply to `problem`. paper: paper_answer(text) equals its answer string,
    stopped or not. strict: the reply stopped and its last '####' number equals its gold. math,
    math-verify: its last \\boxed{} is its answer (harness/mathnorm.py), stopped or not."""
    if rule == "paper":
        return float(paper_answer(text) == problem["answer"])
    if rule == "strict":
        return float(bool(finished) and same_number(extract_strict(text), problem["gold"]))
    if rule == "math":  # verl's math_reward: the fork's MATH reward
        return float(mathnorm.same_answer(mathnorm.last_boxed(text), problem["answer"]))
    if rule == "math-verify":
        return float(mathnorm.verified(text, problem["answer"]))
    raise ValueError(f"unknown reward {rule!r} (use {' or '.join(REWARDS)})")

def score(reply, problem, finished, n_tokens):
    """One reply's verdicts: the two rewards, hash_right (the last '####' number, stopped or not)
    and flexible (the last number) right, and what it holds."""
    gold = problem["gold"]
    return dict(paper=reward(reply, problem, finished, "paper") == 1.0,
                strict=reward(reply, problem, finished, "strict") == 1.0,
                hash_right=same_number(extract_strict(reply), gold),
                flexible=same_number(extract_flexible(reply), gold),
                has_hash=extract_strict(reply) is not None,
                unparseable=extract_flexible(reply) is None,
                finished=bool(finished), n_tokens=n_tokens)

# ---- Data: GSM8K from the hub, a .jsonl file or a folder -------------------------------------
def gsm8k_problem(ex, where):
    """{question, gold, answer, solution} from a GSM8K record {question, answer: '... #### N'}; a
    clear error otherwise. gold: N as a number; answer: N as verl's ground truth (the string,
    commas removed); solution: the answer without its <<calculator>> notes (the SFT target)."""
    q = ex.get("question") if isinstance(ex, dict) else None
    a = ex.get("answer") if isinstance(ex, dict) else None
    gold = extract_strict(a) if isinstance(a, str) else None
    if not isinstance(q, str) or not q.strip() or gold is None:
        raise ValueError(f"{where}: needs a 'question' and an 'answer' ending in '#### <number>', "
                         f"got {str(ex)[:120]}")
    answer = paper_answer(a) or STRICT_RE.findall(a)[-1].replace(",", "")
    return dict(question=q, gold=gold, answer=answer, solution=re.sub(r"<<[^>]*>>", "", a).strip())

def load_problems(spec, split):
    """A split's problems from the hub, a .jsonl or .parquet file or a folder (harness/data.py), in
    GSM8K's schema or SimpleRL's (question, gt_answer: rows without a gold answer are skipped)."""
    records = data.read_records(spec, split)  # [(where, record)]
    if isinstance(records[0][1], dict) and "gt_answer" in records[0][1]:
        return data.math_problems(records, spec)
    return [gsm8k_problem(ex, where) for where, ex in records]

def load_task(spec, split, shots=None, val=0):
    """(problems, shots) for --data; split: train | val | test. shots: [(question, solution)] × K,
    the train split's first K (None: arith 2, else 0); val: how many of the last training problems
    form the validation split. 'train' excludes both shots and validation."""
    K = (2 if spec in data.SYNTHETIC else 0) if shots is None else shots
    if K < 0 or val < 0:
        raise ValueError(f"--shots and --val must be >= 0, got {K} and {val}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r} (train, val or test)")
    load = data.SYNTHETIC.get(spec, lambda split: load_problems(spec, split))
    if split == "test" and K == 0:
        return load("test"), []
    train = load("train")  # a single .jsonl file is every split; a folder keeps them apart
    if K + val >= len(train):
        raise ValueError(f"{K} shots + {val} validation problems leave nothing of the "
                         f"{len(train)} training problems")
    examples = [(p["question"], p["solution"]) for p in train[:K]]
    if split == "test":
        return load("test"), examples
    return (train[K:len(train) - val] if split == "train" else train[len(train) - val:]), examples

# ---- The prompt ------------------------------------------------------------------------------
def build_prompt(tok, question, shots=(), style="gsm8k"):
    """The model's chat template: the style's system message, each shot a user turn (its question +
    the suffix) answered by its solution, then the question + the suffix (lm-eval-harness's
    few-shot-as-multiturn)."""
    system, suffix = PROMPTS[style]
    msgs = [dict(role="system", content=system)] if system else []
    for q, a in shots:
        msgs += [dict(role="user", content=q + suffix), dict(role="assistant", content=a)]
    msgs.append(dict(role="user", content=question + suffix))
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

def prompt_ids(tok, problems, shots, max_prompt, style="gsm8k"):
    """[(problem, token ids)] of each problem's prompt; those over max_prompt tokens are dropped
    (verl)."""
    out = []
    for problem in problems:
        ids = tok(build_prompt(tok, problem["question"], shots, style),
                  add_special_tokens=False)["input_ids"]
        if len(ids) <= max_prompt:
            out.append((problem, ids))
    return out

# ---- Schedules: any step's batch and learning rate follow from (seed, step): --resume is exact
SEED_STRIDE = 1000003  # pairs (seed, k) with 0 <= k < SEED_STRIDE map to distinct seeds

def seed_for(seed, k):
    """A seed for (run seed, k): an epoch, a step, or a sample's place in a batch."""
    return seed * SEED_STRIDE + k

def batch_at(items, step, B, seed, shuffle=True):
    """The step's B items, in the file's order (the fork's data.shuffle=False) or a permutation per
    epoch from (seed, epoch), so any step is recomputed; a short last batch is dropped (verl)."""
    epoch, k = divmod(step, len(items) // B)
    order = list(range(len(items)))
    if shuffle:
        random.Random(seed_for(seed, epoch)).shuffle(order)
    return [items[i] for i in order[k * B:(k + 1) * B]]

def lr_at(step, total, lr, warmup_frac):
    """verl's constant schedule with warm-up: lr · step / w over the first w = ⌊warmup_frac · total⌋
    rollout steps (lr 0 at step 0), then lr."""
    w = int(warmup_frac * total)
    return lr * step / w if step < w else lr
