"""After a run, the next command works as typed: a run prints what to run next with its own paths,
each printed command runs as printed, the programs that take an adapter default to what it and its
run record (an explicit flag still wins), and every program answers --help. CPU only, no
network."""
import importlib
import json
import shlex
import sys

import pytest

import eval as E
import tinylora
import train_grpo as tg
from harness import export, serve
from harness.tests.fixtures import (cli, tiny_model, tiny_run_args)

PROGRAMS = {"python eval.py": E.main, "python train_grpo.py": tg.main,
            "python -m harness.serve": serve.main, "python -m harness.export": export.main}


def printed_commands(out):
    """The commands under 'next:' in a run's console output."""
    lines = out.split("next:\n", 1)[1].splitlines()
    return [line.strip() for line in lines if line.startswith("  python")]


def run_as_printed(command):
    """A printed command, in-process: the program's main with the command's own arguments."""
    program = next(p for p in PROGRAMS if command.startswith(p + " "))
    return PROGRAMS[program](shlex.split(command[len(program):]))


@pytest.fixture(scope="module")
def tiny_run(answer_folder, sevens_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    return out, tiny_run_args(answer_folder, sevens_jsonl, out, steps=2)


def test_a_run_ends_by_printing_the_next_commands_and_each_runs_as_printed(tiny_run, capsys):
    out, argv = tiny_run
    tg.main(argv)
    commands = printed_commands(capsys.readouterr().out)
    adapter = out / "adapter.safetensors"
    assert [c.split(" --")[0] for c in commands] == [
        "python eval.py", "python -m harness.serve", "python -m harness.export export-lora",
        "python -m harness.export merge", "python train_grpo.py"]
    assert all(str(adapter) in c or f"--resume {out}" in c for c in commands)
    results = run_as_printed(commands[0])  # eval: the run's model, data and generator settings
    assert list(results["models"]) == ["base", "adapter"] and results["config"]["data"] == argv[3]
    replies = run_as_printed(commands[1])  # serve: the base and this adapter, the run's prompt
    assert [r["adapter"] for r in replies] == ["base", "adapter"] * (len(replies) // 2)
    run_as_printed(commands[2])
    assert json.load(open(out / "lora" / "adapter_config.json"))["r"] == 2
    run_as_printed(commands[3])
    assert (out / "merged" / "config.json").exists()
    run_as_printed(commands[4])  # resume: twice the steps, from where it stopped
    log = [json.loads(x) for x in open(out / "log.jsonl")]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4]


def test_eval_takes_the_model_and_data_the_run_recorded_and_a_flag_typed_still_wins(
        tiny_run, capsys):
    out, argv = tiny_run
    adapter = str(out / "adapter.safetensors")
    if not (out / "adapter.safetensors").exists():
        tg.main(argv)
    capsys.readouterr()
    args = E.config.eval_args(["--adapter", adapter])
    said = capsys.readouterr().out
    assert (args.model, args.data, args.max_new_tokens, args.backend) == (argv[1], argv[3], 6, "hf")
    assert said.startswith("defaults the base") and "config.json: --data" in said
    assert said.count("\n") == 1
    assert E.config.eval_args(["--adapter", adapter, "--max-new-tokens", "9"]).max_new_tokens == 9


def test_a_model_other_than_the_adapters_base_is_refused_by_the_fingerprint(tiny_run, tmp_path):
    out, argv = tiny_run
    if not (out / "adapter.safetensors").exists():
        tg.main(argv)
    other = tmp_path / "other"
    tiny_model("qwen2", seed=7, vocab=49152).save_pretrained(other)
    import shutil
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{argv[1]}/{f}", other / f)
    with pytest.raises(ValueError, match="adapter was made for different base weights"):
        E.main(["--adapter", str(out / "adapter.safetensors"), "--model", str(other)])
    assert not any(isinstance(m, tinylora.TinyLoRALinear) for m in tiny_model().modules())


def test_export_answers_help_and_names_its_verbs_in_one_line_otherwise(capsys):
    export.main(["--help"])
    assert "python -m harness.export {plan,merge,export-lora}" in capsys.readouterr().out
    with pytest.raises(ValueError) as e:
        export.main(["merged"])
    assert "takes plan, merge or export-lora first, got 'merged'" in str(e.value)


@pytest.mark.parametrize("program", ["train_grpo.py", "eval.py", "harness.sft", "harness.sweep",
                                     "harness.rl_vs_sft", "harness.serve", "harness.bench",
                                     "harness.gpu_check", "harness.export"])
def test_every_program_answers_help_naming_the_command_as_typed(program, monkeypatch, capsys):
    module = importlib.import_module(program.removesuffix(".py"))
    monkeypatch.setattr(sys, "argv", [module.__file__])  # as `python X.py` / `python -m` set it
    try:  # argparse exits 0 after --help; harness.export prints its verbs and returns
        module.main(["--help"])
        code = 0
    except SystemExit as e:
        code = e.code
    typed = f"python -m {program}" if program.startswith("harness.") else program
    assert code == 0 and f"usage: {typed}" in capsys.readouterr().out


@pytest.mark.slow
def test_after_the_demo_the_printed_eval_runs_as_typed(smol_folder, tmp_path, capsys):
    out = tmp_path / "demo"
    p = cli("train_grpo.py", "--preset", "cpu-demo", "--model", smol_folder, "--steps", "1",
            "--batch-prompts", "2", "--eval-n", "4", "--backend", "hf", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    command = printed_commands(p.stdout)[0]
    assert command == f"python eval.py --adapter {out}/adapter.safetensors --compare"
    E.main([*shlex.split(command)[2:], "--limit", "4"])  # its words after `python eval.py`
    printed = capsys.readouterr().out
    assert "defaults the base" in printed and "base" in printed and "adapter" in printed
