"""Specifications of harness/mathnorm.py: verl's MATH reward rule (the last \\boxed{}, Hendrycks'
normalisation, string equality) on the normalisation's own cases, computed by hand from verl's
math_reward.py; Qwen2.5-Math's extraction; the Math-Verify rule; hypothesis over the text around a
boxed gold. CPU only, no network."""
import pytest
from hypothesis import given, settings, strategies as st

import task
from harness import mathnorm as M


@pytest.mark.parametrize("raw,normal", [
    ("\\frac12", "\\frac{1}{2}"), ("\\frac1{72}", "\\frac{1}{72}"),
    ("\\dfrac{3}{4}", "\\frac{3}{4}"), ("\\tfrac{3}{4}", "\\frac{3}{4}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("50\\%", "50"), ("\\$18", "18"),
    ("10\\text{ cm}", "10"), ("x = 5", "5"), ("k=7", "7"), ("xyz = 5", "xyz=5"),
    ("3/4", "\\frac{3}{4}"),
    ("-3/4", "\\frac{-3}{4}"), ("03/4", "03/4"), ("0.5", "\\frac{1}{2}"), (".5", "\\frac{1}{2}"),
    ("\\sqrt3", "\\sqrt{3}"), ("2\\sqrt{2}", "2\\sqrt{2}"), ("1\n000", "1000"), ("\\!1", "1"),
    ("a \\\\ b", "a\\b"), ("{.5}", "{0.5}"), ("", "")])
def test_strip_string_is_hendrycks_normalisation_as_verl_orders_it(raw, normal):
    assert M.strip_string(raw) == normal


@pytest.mark.parametrize("reply,gold,paid", [
    ("so the answer is $\\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac12", 1.0), ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{3} then \\boxed{4}", "4", 1.0), ("\\boxed{3} then \\boxed{4}", "3", 0.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0),
    ("the answer is 4", "4", 0.0),  # no box: 0
    ("\\fbox{4}", "4", 0.0),  # verl's remove_boxed refuses \fbox
    ("\\boxed 4$ more", "4", 1.0),  # verl's '\boxed ' form
    ("\\boxed{4", "4", 0.0),  # braces never close
    ("\\boxed{90^\\circ}", "90", 1.0), ("\\boxed{10\\%}", "10", 1.0),
    ("\\boxed{\\text{(B)}}", "B", 0.0),  # no rule strips \text{(B)}
    ("\\boxed{a\\text{ m}\\text{ s}}", "a\\text{ m}\\text{ s}", 1.0),  # two units: raw strings
    ("\\boxed{\\frac}", "\\frac", 1.0)])  # a bare \frac: verl compares the raw strings
def test_the_math_reward_pays_what_verls_rule_pays(reply, gold, paid):
    assert task.reward(reply, dict(answer=gold, gold=None), True, "math") == paid


GOLDS = st.sampled_from(["4", "\\frac{1}{2}", "\\sqrt{3}", "-7", "(1,2)", "\\pi", "x^2+1", "0.25"])
AROUND = st.lists(st.sampled_from(list("abc 0123.,$\n(){}") + ["the answer is ", "\\frac"]),
                  max_size=12).map("".join)


@settings(max_examples=200, deadline=None)
@given(before=AROUND, after=AROUND, gold=GOLDS, pad=st.text(alphabet=" \n", max_size=3))
def test_any_text_around_the_boxed_gold_with_spaces_inside_is_paid(before, after, gold, pad):
    reply = f"{before}\\boxed{{{pad}{gold}{pad}}}{after}"
    assert task.reward(reply, dict(answer=gold, gold=None), False, "math") == 1.0
    assert task.reward(before + after, dict(answer=gold, gold=None), False, "math") == 0.0


@pytest.mark.parametrize("reply,pred", [
    ("... The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
    ("so \\boxed{\\frac{1}{\\sqrt{2}}} and", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed 12$", "12"), ("The answer is 42.", "42"), ("the final answer is: 7/", "7"),
    ("We get 3, then 1,234.5 apples", "1234.5"), ("nothing", "")])
def test_qwen_math_extraction_reads_minerva_then_box_then_phrase_then_last_number(reply, pred):
    assert M.qwen_extract(reply) == pred


@pytest.mark.parametrize("reply,gold,right", [
    ("\\boxed{0.5}", "\\frac{1}{2}", True), ("\\boxed{27.0}", "27", True),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{3}", "2", False), ("no answer", "3", False)])
def test_math_verify_decides_equivalence_by_sympy(reply, gold, right):
    assert task.reward(reply, dict(answer=gold, gold=None), True, "math-verify") == float(right)
