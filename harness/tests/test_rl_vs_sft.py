"""Specifications of harness/rl_vs_sft.py: the lr choice, the paired statistics (hand-computed
McNemar counts per seed and pooled, the sign count), the spread over seeds, the table, the CLI."""
import os

import pytest

from harness import config, rl_vs_sft

T, F = True, False


def rows(*seeds):
    """{seed: held-out row} with strict verdicts as given."""
    return {s: dict(seed=s, params=13, strict=dict(acc=sum(v) / len(v)),
                    verdicts=[dict(strict=x) for x in v]) for s, v in enumerate(seeds)}


def test_chosen_takes_the_best_validation_lr_and_its_held_out_seeds():
    done = {(f"sft-1-lr{lr:g}-s0", "val"): dict(strict=dict(acc=a))
            for lr, a in [(0.01, 0.5), (0.03, 0.5)]}
    done[("sft-1-lr0.01-s2", "test")] = dict(seed=2)
    done[("sft-1-lr0.03-s0", "test")] = dict(seed=0)
    done[("sft-13-lr0.01-s0", "test")] = dict(seed=0)  # another budget
    assert rl_vs_sft.chosen(done, "1", "sft", [0.03, 0.01]) == (0.01, {2: dict(seed=2)})
    assert rl_vs_sft.chosen(done, "1", "rl", [0.03, 0.01]) == (None, {})  # not run yet


def test_paired_counts_discordant_problems_per_seed_pools_them_and_counts_signs():
    a = rows([T, T, F, F, T], [T, F, F, T, F], [T, T, T, T, T])
    b = rows([F, F, F, F, T], [F, T, F, T, F])  # seed 2 has no partner: left out
    out = rl_vs_sft.paired(a, b)
    # seed 0: a alone right twice, b never: p = 2 * (1/2)^2; seed 1: 1 and 1: p = 1
    assert out["seeds"] == [(0, 2, 0, 0.5), (1, 1, 1, 1.0)]
    assert out["pooled_p"] == pytest.approx(2 * (1 + 4) / 2 ** 4)  # 3 against 1
    assert (out["a_wins"], out["b_wins"]) == (1, 0)
    flipped = rl_vs_sft.paired(b, a)
    assert flipped["seeds"] == [(0, 0, 2, 0.5), (1, 1, 1, 1.0)]
    assert (flipped["a_wins"], flipped["b_wins"]) == (0, 1)


def test_spread_is_mean_min_and_max_over_seeds():
    assert rl_vs_sft.spread(rows([T, F, F, F], [T, T, F, F], [T, T, T, T])) == (
        pytest.approx(7 / 12), 0.25, 1.0)


def test_accounts_average_the_equation_account_over_seeds():
    problems = [dict(gold=5), dict(gold=3)]
    a = rows([T, F], [T, F])
    for r, replies in zip(a.values(), (["2 + 3 = 5.\n#### 5", "1 + 1 = 2.\n#### 2"],
                                       ["2 + 3 = 5.\n#### 2", "1 + 2 = 3.\n#### 3"])):
        for v, text in zip(r["verdicts"], replies):
            v["reply"] = text
    assert rl_vs_sft.accounts(a, problems) == dict(copied=0.25, right_equations=0.75)
    assert rl_vs_sft.accounts(rows([T, F]), problems) is None  # a sweep that kept no replies


def test_contrast_row_reports_rl_against_sft_per_seed_and_pooled():
    line, verdict = rl_vs_sft.contrast_row("13", rows([T, T, T, F], [T, T, F, F]),
                                           rows([F, F, T, F], [T, F, F, T]))
    # seed 0: 2 RL-only, 0 SFT-only; seed 1: 1 and 1; pooled 3 / 1
    assert line == ("| 13 | 13 | 62.5% | 37.5% | 2/0 (0.5), 1/1 (1) | 0.625 | 1 / 0 "
                    "| not distinguished |")
    assert verdict == "not distinguished"


def test_a_method_row_gives_each_seed_against_the_base_and_counts_the_significant_gains():
    base = dict(verdicts=[dict(strict=False)] * 8, strict=dict(acc=0.0))
    seeds = {0: [T] * 6 + [F] * 2, 1: [T] * 2 + [F] * 6}  # 6/0 (p = 2/64) and 2/0 (p = 0.5)
    done = {("base", "test"): base, ("rl-13-lr0.01-s0", "val"): dict(strict=dict(acc=0.5))}
    for s, right in seeds.items():
        done[(f"rl-13-lr0.01-s{s}", "test")] = dict(
            seed=s, params=13, strict=dict(acc=sum(right) / 8),
            verdicts=[dict(strict=x) for x in right])
    line = rl_vs_sft.method_row(done, "13", "rl", [0.01], base, [])
    assert "| 6/0 (0.031), 2/0 (0.5); p = 0.00781 | 1 of 2 |" in line  # pooled 8/0: 2/256


def counts(seeds, pooled_p):
    """paired()'s result for per-seed (a_only, b_only) counts and a given pooled p."""
    return dict(seeds=[(s, a, b, 1.0) for s, (a, b) in enumerate(seeds)], pooled_p=pooled_p,
                a_wins=sum(a > b for a, b in seeds), b_wins=sum(a < b for a, b in seeds))


def test_a_method_beats_the_other_only_with_a_higher_mean_pooled_p_below_005_and_every_seed():
    win = counts([(9, 2), (8, 3), (7, 1)], 1e-4)
    assert rl_vs_sft.verdict(win, 0.40, 0.30) == "RL beats SFT"
    assert rl_vs_sft.verdict(counts([(2, 9), (3, 8), (1, 7)], 1e-4), 0.3, 0.4) == "SFT beats RL"
    assert rl_vs_sft.verdict(counts([(9, 2), (8, 3), (7, 1)], 0.05), 0.4, 0.3) == \
        "not distinguished"  # p = alpha is not below it
    assert rl_vs_sft.verdict(counts([(9, 2), (8, 3), (1, 7)], 1e-4), 0.4, 0.3) == \
        "not distinguished"  # two seeds of three
    assert rl_vs_sft.verdict(counts([(9, 2), (8, 3), (3, 3)], 1e-4), 0.4, 0.3) == \
        "not distinguished"  # a tie is not a win
    assert rl_vs_sft.verdict(counts([(2, 9), (3, 8), (7, 1)], 1e-4), 0.3, 0.4) == \
        "not distinguished"  # SFT's side: two seeds of three
    assert rl_vs_sft.verdict(win, 0.30, 0.40) == "not distinguished"  # the declared mean clause


def test_the_papers_contrast_holds_when_rl_beats_sft_at_13_or_fewer_and_sft_never_does_there():
    assert rl_vs_sft.contrast_holds({1: "not distinguished", 13: "RL beats SFT",
                                     210: "SFT beats RL"})
    assert not rl_vs_sft.contrast_holds({13: "not distinguished", 210: "SFT beats RL"})
    assert not rl_vs_sft.contrast_holds({1: "SFT beats RL", 13: "RL beats SFT"})
    assert not rl_vs_sft.contrast_holds({13: "not distinguished", 52: "RL beats SFT"})


def test_the_report_of_two_sweeps_has_a_table_each_and_one_figure(tmp_path):
    sweep = os.path.join(config.ROOT, "docs", "cpu-sweep")  # the 2-shot sweep on file (one seed)
    rl_vs_sft.main([sweep, sweep, "--labels", "a,b", "--out", str(tmp_path)])
    text = (tmp_path / "table.md").read_text()
    assert text.count("| a RL vs SFT |") == text.count("| b RL vs SFT |") == 1
    # its 210-parameter contrast, seed 0: 11 RL-only against 35 SFT-only right answers
    assert ("| 210 | 210 | 45.5% | 57.5% | 11/35 (0.000536) | 0.000536 | 0 / 1 | SFT beats RL |"
            in text)
    assert text.count("The paper's contrast") == 2 and "on a: does not hold" in text
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_the_report_refuses_a_folder_without_results_and_a_wrong_label_count(tmp_path):
    with pytest.raises(ValueError, match="no results.jsonl"):
        rl_vs_sft.main([str(tmp_path), "--out", str(tmp_path / "out")])
    sweep = os.path.join(config.ROOT, "docs", "cpu-sweep")
    with pytest.raises(ValueError, match="--labels names 1 sweeps, 2 given"):
        rl_vs_sft.main([sweep, sweep, "--labels", "a", "--out", str(tmp_path / "out")])
