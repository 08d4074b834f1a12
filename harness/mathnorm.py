"""
MATH answers as strings, for task.py's rewards and eval.py's MATH suite: verl's math_reward rule
(the author's fork's MATH reward: the last \\boxed{...} of a reply, Hendrycks' normalisation, string
equality), written after verl/utils/reward_score/math_reward.py (volcengine/verl; the MATH
dataset's own is_equiv), and Qwen2.5-Math's answer extraction for the evaluation
(examples/simplelr_math_eval/parser.py extract_answer, as SimpleRL-Zoo and the fork evaluate).
Pure functions on strings; of them only strip_string raises, where verl's does.
"""
import logging
import re


def last_boxed(text):
    """The content of the last \\boxed{...} (braces matched), or verl's '\\boxed x$' form; None
    without one (verl's \\fbox never pays: its remove_boxed asserts a \\boxed prefix)."""
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if text[i] == "}" and depth == 0:
            inner = text[start + len("\\boxed"):i + 1]
            return inner[1:-1] if inner.startswith("{") else None
    return None


def fix_fracs(s):
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}; one character after \\frac: s; none:
    IndexError, as verl (whose is_equiv then compares the raw strings)."""
    head, *parts = s.split("\\frac")
    out = head
    for part in parts:
        out += "\\frac"
        if part[0] == "{":
            out += part
        elif len(part) < 2:
            return s
        elif part[1] == "{":
            out += "{" + part[0] + "}" + part[1:]
        else:
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
    return out


def fix_a_slash_b(s):
    """'3/4' (two integers, nothing else) -> \\frac{3}{4}."""
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    ok = m and all(str(int(g)) == g for g in m.groups())
    return f"\\frac{{{int(m[1])}}}{{{int(m[2])}}}" if ok else s


def fix_sqrt(s):
    """\\sqrt3 -> \\sqrt{3} (the one character after \\sqrt; none: IndexError, as verl)."""
    head, *parts = s.split("\\sqrt")
    return head + "".join("\\sqrt" + (p if p[0] == "{" else "{" + p[0] + "}" + p[1:])
                          for p in parts)


def strip_string(s):
    """Hendrycks' MATH normalisation, in verl's order."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""),
                     ("\\$", "")):
        s = s.replace(old, new)
    if "\\text{ " in s:  # a unit after the answer ('\\text{ cm}'); verl asserts a single one
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError(f"more than one '\\text{{ ' in {s!r}")
        s = parts[0]
    for old, new in (("\\\\%", ""), ("\\%", ""), (" .", " 0."), ("{.", "{0.")):
        s = s.replace(old, new)
    if not s:
        return s
    s = "0" + s if s[0] == "." else s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # a short 'x = ' before the answer
        s = sides[1]
    s = fix_fracs(fix_sqrt(s).replace(" ", ""))
    return fix_a_slash_b("\\frac{1}{2}" if s == "0.5" else s)


def same_answer(answer, gold):
    """verl's is_equiv: the two normalised strings are equal, or where normalising fails the raw
    ones (None is never equal)."""
    if answer is None or gold is None:
        return False
    try:
        return strip_string(answer) == strip_string(gold)
    except (IndexError, ValueError):
        return answer == gold


def qwen_extract(text):
    """Qwen2.5-Math's answer extraction: Minerva's 'final answer is $..$. I hope', else the last
    \\boxed (its brace matching), else after 'the answer is' / 'final answer is', else the last
    number; then newlines and a leading ':' or trailing '.' or '/' dropped."""
    if "final answer is $" in text and "$. I hope" in text:
        pred = text.split("final answer is $", 1)[1].split("$. I hope", 1)[0].strip()
    elif "boxed" in text:
        rest, depth, pred = text.split("boxed")[-1], 1, ""
        if rest.startswith("{"):
            for ch in rest[1:]:
                depth += {"{": 1, "}": -1}.get(ch, 0)
                if depth == 0:
                    break
                pred += ch
        else:
            pred = rest.split("$")[0].strip()
    elif "he answer is" in text:
        pred = text.split("he answer is")[-1].strip()
    elif "final answer is" in text:
        pred = text.split("final answer is")[-1].strip()
    else:
        numbers = re.findall(r"-?\d*\.?\d+", text.replace(",", ""))
        pred = numbers[-1] if numbers else ""
    pred = re.sub(r"\n\s*", "", pred)
    pred = pred[1:] if pred.startswith(":") else pred
    pred = pred[:-1] if pred.endswith(".") else pred
    return (pred[:-1] if pred.endswith("/") else pred).strip()  # Qwen's strip_string: no spaces


def verified(text, gold):
    """verl's Math-Verify rule (reward_score/math_verify.py, as SimpleRL-Zoo's trainer grades): the
    gold as \\boxed{gold} and the reply's expressions or LaTeX are equivalent by sympy; a timeout or
    a parse failure scores False."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig  # sympy: ~1 s to import
    from math_verify.metric import math_metric
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # a reply without an answer: a 0
    grade = math_metric(gold_extraction_target=(LatexExtractionConfig(),),
                        pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()))
    try:
        return grade(["\\boxed{" + gold + "}"], [text])[0] == 1.0
    except Exception:  # math_verify's own TimeoutException and parse errors: not verified
        return False
