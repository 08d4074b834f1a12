"""
What arithmetic replies hold beyond right and wrong (the CPU demo's account, used by the RL-vs-SFT
report and the serving demo): whether the '####' number is the result of the equation the reply
wrote just before it, or a copy of a solved example's answer.
"""
import re

from task import extract_strict

EQUATION = re.compile(r"(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)")


def equation_account(problems, replies):
    """The share of replies whose '####' number differs from the result of the last equation
    'a ± b = c' they wrote before it (the model copying a shot's answer), and the share whose
    equation's result is the problem's answer. problems: task problems; replies: their texts."""
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
