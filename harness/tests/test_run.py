"""Specifications of harness/run.py: the config on the console, the run folder (a killed run brought
back to its checkpoint), the log's account of a run. CPU only, no network."""
import json
import sys

import pytest
import torch

from harness import config, run
from harness.files import append_jsonl, read_jsonl


def test_the_console_config_names_every_resolved_value_within_100_columns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = config.trainer_args(["--params", "13", "--preset", "cpu-demo"])
    text = config.summary(dict(vars(args), resolved=dict(device="cpu", world_size=1)))
    words = text.split()
    assert words[0] == "config:" and all(len(line) <= 100 for line in text.splitlines())
    assert {w.split("=", 1)[0] for w in words[1:]} == set(vars(args)) | {"device", "world_size"}
    assert "betas=(0.9,0.999)" in words and "lr=0.01" in words and "micro_batch=32" in words


def test_a_resumed_run_drops_the_log_rows_and_temp_files_past_its_checkpoint(tmp_path):
    rows = [dict(kind="eval", step=0), dict(kind="train", step=1), dict(kind="train", step=2),
            dict(kind="train", step=3)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "checkpoint.safetensors.tmp12").write_bytes(b"torn")
    run.recover_run(str(tmp_path), 2)
    assert read_jsonl(str(tmp_path / "log.jsonl")) == rows[:3]
    assert not list(tmp_path.glob("*.tmp*"))
    run.recover_run(str(tmp_path), 0)  # a fresh run in an old folder starts an empty log
    assert read_jsonl(str(tmp_path / "log.jsonl")) == []


def test_the_running_mean_hand_computed():
    assert run.running_mean([1, 0, 0, 1, 1], 2) == [1, 0.5, 0, 0.5, 1]
    assert run.running_mean([3, 1, 2], 4) == [3, 2, 2] and run.running_mean([], 4) == []


def test_before_after_counts_the_paired_changes_and_shows_a_gained_problem():
    first = dict(strict=0.5, right=[1, 0, 0, 1, 0, 1], questions=list("abcdef"),
                 replies=["r0", "wrong b", "r2", "r3", "r4", "r5"])
    last = dict(first, strict=2 / 3, right=[1, 1, 1, 0, 0, 1],
                replies=["r0", "right b"] + ["x"] * 4)
    text = run.before_after(first, last)
    assert text.startswith("held-out strict 50.0% -> 66.7%: 2 gained, 1 lost, McNemar p = 1")
    assert "e.g. b\n    before: 'wrong b'\n    after:  'right b'" in text
    assert "e.g." not in run.before_after(first, dict(first))  # nothing gained: no example


def test_the_reward_plot_is_skipped_in_one_line_without_matplotlib(monkeypatch, tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(dict(kind="train", step=1, reward=0.5)) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert run.plot_rewards(str(log), str(tmp_path / "reward.png")) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "reward.png").exists()


def test_the_reward_plot_draws_the_held_out_metric_its_rows_name(tmp_path):
    rows = [dict(kind="train", step=1, reward=0.5)] + [
        dict(kind="eval", step=s, metric="math", math=a) for s, a in ((0, 0.1), (1, 0.2))]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))  # a MATH run: no "strict"
    assert run.plot_rewards(str(log), str(tmp_path / "reward.png")) == str(tmp_path / "reward.png")
    assert (tmp_path / "reward.png").stat().st_size > 0


def test_the_cpu_demo_keeps_the_optimisation_its_search_chose(monkeypatch):
    """The demo was chosen before the fork's clip, weight decay, data order, dual clip and P became
    the defaults; its preset keeps what it was chosen with (docs/reproduction.md)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    demo = config.trainer_args(["--preset", "cpu-demo"])
    kept = (demo.grad_clip, demo.weight_decay, demo.shuffle, demo.dual_clip, demo.projections)
    assert kept == (1.0, 0.0, True, 0.0, "independent") and demo.warmup == 0.0


def test_time_left_is_said_after_the_first_step_and_each_epoch_at_their_pace(tmp_path, capsys):
    log = str(tmp_path / "log.jsonl")
    append_jsonl(log, dict(kind="heldout", step=0))
    said = []
    for step in range(1, 349):  # 116 steps an epoch, 3 epochs; the first step slower
        append_jsonl(log, dict(kind="train", step=step, t_step=40.0 if step == 1 else 30.0))
        run.time_left(str(tmp_path), step, 0, 348, 116)
        said += [(step, line) for line in capsys.readouterr().out.splitlines()]
    # 347 × 40 s = 3 h 51 min; 232 × (40 + 115 × 30) / 116 s = 1 h 56 min; 116 × 30 s = 58 min
    assert said == [
        (1, "step 1 took 40.0 s (a first step can be slower): 347 steps left ≈ 3 h 51 min"),
        (116, "epoch 1 done at 30.1 s a step: 232 steps left ≈ 1 h 56 min"),
        (232, "epoch 2 done at 30.0 s a step: 116 steps left ≈ 0 h 58 min")]
    append_jsonl(log, dict(kind="train", step=101, t_step=50.0))  # resumed at 100 elsewhere
    run.time_left(str(tmp_path), 101, 100, 348, 116)  # its first step alone sets the pace
    assert capsys.readouterr().out.startswith("step 101 took 50.0 s")


def test_a_checkpoint_written_before_projections_were_recorded_resumes_only_under_independent_P(
        tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    import tinylora
    from harness.tests.fixtures import tiny_model
    m = tiny_model("qwen2", vocab=300, layers=2)
    bank = tinylora.apply_tinylora(m, params=13, projections="independent")
    opt = torch.optim.AdamW([bank.v])
    path = str(tmp_path / "checkpoint.safetensors")
    run.save_checkpoint(path, bank, opt, 3, 3, {})
    with safe_open(path, framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["trainer"])
    del meta["tinylora"]["projections"]  # as checkpoints were written before --projections
    save_file(tensors, path, metadata={"trainer": json.dumps(meta)})
    assert run.load_checkpoint(path, bank, opt) == (3, 3)
    tinylora.remove_tinylora(m)
    fork = tinylora.apply_tinylora(m, params=13, projections="fork")
    with pytest.raises(ValueError, match=r"'projections': \('independent', 'fork'\)"):
        run.load_checkpoint(path, fork, torch.optim.AdamW([fork.v]))
