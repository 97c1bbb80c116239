"""The training scripts' command line (common/cli.py, common/args.py): --config, other tools' names, near misses,
--help, and config files a careless or hostile user writes. Each answer is one line and exit status 2."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import pytest

import train_actor
from common import cli
from tests.helpers import ROOT
from losses import LossConfig
from sender import train as train_sender

RECIPE = os.path.join(ROOT, "recipes", "qwen2.5-0.5b.yaml")


def _error(main, argv, capsys) -> str:
    """The one line a refused command line prints (exit status 2)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------
# --config, aliases, refusals, near misses
# ---------------------------------------------------------------------------------------------
def test_config_flag_is_the_positional_file():
    positional = train_actor.parse_args([RECIPE, "--output_dir", "o"])
    flagged = train_actor.parse_args(["--config", RECIPE, "--output_dir", "o"])
    assert positional[0] == flagged[0] and positional[1] == flagged[1]
    assert positional[2].to_dict() == flagged[2].to_dict() and flagged[2].per_device_train_batch_size == 32
    assert train_actor.parse_args([f"--config={RECIPE}", "--output_dir", "o"])[1] == positional[1]


def test_two_config_files_or_none_after_config_are_refused(capsys):
    assert "two config files" in _error(train_actor.main, [RECIPE, "--config", RECIPE], capsys)
    assert "--config needs a file" in _error(train_actor.main, ["--config", "--output_dir", "o"], capsys)
    assert "must end in .yaml" in _error(train_actor.main, ["recipe.txt", "--output_dir", "o"], capsys)


def test_trl_and_transformers_names_are_read_as_ours(tmp_path):
    model, data, args = train_actor.parse_args(["--output_dir", "o", "--max_seq_length", "512", "--dtype", "bfloat16",
                                                "--validation_file", "v.jsonl", "--packing", "false"])
    assert (data.model_max_length, model.base_dtype, data.eval_file, model.packed_sequences) == \
        (512, "bfloat16", "v.jsonl", False)
    assert train_actor.parse_args(["--output_dir", "o", "--torch_dtype=float16", "--max_length=64"])[:2] == \
        train_actor.parse_args(["--output_dir", "o", "--base_dtype", "float16", "--model_max_length", "64"])[:2]
    config = tmp_path / "trl.yaml"
    config.write_text("max_seq_length: 256\ndataset_train_split: train\ndataset_test_split: test\n"
                      "dataset_name: org/data\noutput_dir: o\n")
    _, data, _ = train_actor.parse_args([str(config)])
    assert (data.model_max_length, data.dataset_split, data.eval_split) == (256, "train", "test")
    _, data, _ = train_sender.parse_args(["--output_dir", "o", "--max_seq_length", "300"])
    assert data.model_max_length == 300


@pytest.mark.parametrize("argv, ours", [
    (["--use_peft"], "--lora_r N"),
    (["--use_peft", "true", "--lora_r", "8"], "--lora_r N"),
    (["--dataset_text_field", "text"], "conversations or messages"),
    (["--load_in_4bit", "true"], "--base_dtype bfloat16 --lora_r 16"),
    (["--validation_split_percentage", "5"], "--eval_ratio 0.05"),
])
def test_names_with_another_meaning_are_refused_naming_ours(argv, ours, capsys):
    err = _error(train_actor.main, ["--output_dir", "o", *argv], capsys)
    assert err.startswith(f"error: {argv[0]}: ") and ours in err, err


def test_refusals_in_a_config_file_and_for_the_sender(tmp_path, capsys):
    config = tmp_path / "trl.yaml"
    config.write_text("use_peft: true\nlora_r: 16\n")
    err = _error(train_actor.main, [str(config), "--output_dir", "o"], capsys)
    assert err.startswith(f"error: {config}: use_peft: ") and "--lora_r N" in err
    assert "float32 weights" in _error(train_sender.main, ["--output_dir", "o", "--dtype", "bfloat16"], capsys)
    assert "LoRA is the actor's" in _error(train_sender.main, ["--output_dir", "o", "--use_peft"], capsys)


def test_near_misses_name_the_flag_or_key_meant(tmp_path, capsys):
    err = _error(train_actor.main, ["--output_dir", "o", "--lerning_rate", "1e-4"], capsys)
    assert "unknown argument --lerning_rate (did you mean --learning_rate?)" in err
    err = _error(train_actor.main, ["--output_dir", "o", "--max_seq_len", "64"], capsys)  # near another tool's name
    assert "(did you mean --model_max_length?)" in err
    err = _error(train_actor.main, ["--output_dir", "o", "--prepended-lenght", "4"], capsys)
    assert "did you mean --prepended_length?" in err
    err = _error(train_actor.main, ["--output_dir", "o", "--no_such_flag", "1"], capsys)
    assert "--no_such_flag" in err and "did you mean" not in err
    config = tmp_path / "c.yaml"
    config.write_text("per_device_train_batchsize: 4\n")
    err = _error(train_actor.main, [str(config), "--output_dir", "o"], capsys)
    assert f"{config}: unknown key per_device_train_batchsize (did you mean per_device_train_batch_size?)" in err
    # the sender's own flags only: the actor's probe options are no longer inherited, and say so
    err = _error(train_sender.main, ["--output_dir", "o", "--enable_infoNCE_probe", "true"], capsys)
    assert "unknown argument --enable_infoNCE_probe" in err


def test_an_argparse_error_is_one_line_not_the_usage(capsys):
    err = _error(train_actor.main, ["--output_dir", "o", "--learning_rate", "fast"], capsys)
    assert "--learning_rate" in err and "invalid float value" in err
    err = _error(train_actor.main, ["--output_dir", "o", "--negative_form", "mine"], capsys)
    assert "invalid choice" in err and "latents_only" in err


def test_the_loss_settings_are_defined_once_and_reach_the_loss():
    """LossConfig is LossArguments with numbers: every loss flag reaches it by name, none is repeated."""
    from common.args import ActorArguments, LossArguments

    assert issubclass(LossConfig, LossArguments) and issubclass(ActorArguments, LossArguments)
    assert {f.name for f in dataclasses.fields(LossConfig)} == {f.name for f in dataclasses.fields(LossArguments)}
    model, _, _ = train_actor.parse_args(["--output_dir", "o", "--mix_ratios", "0.25,1", "--loss_chunk_size", "0",
                                          "--negative_form", "latents_only", "--random_contrast_weight", "0.5"])
    loss = LossConfig.from_arguments(model)
    assert (loss.mix_ratios, loss.loss_chunk_size, loss.negative_form, loss.random_contrast_weight) == \
        ((0.25, 1.0), None, "latents_only", 0.5)
    assert LossConfig() == LossConfig.from_arguments(train_actor.parse_args(["--output_dir", "o"])[0])


# ---------------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------------
def _options(text: str, section: str) -> list[str]:
    """The option names a help section lists."""
    part = text.split(f"\n{section}:\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^  (--[\w-]+)", part, re.M)


@pytest.mark.parametrize("main", [train_actor.main, train_sender.main], ids=["train_actor", "train_sender"])
def test_help_describes_first_and_groups_the_options(main, capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    usage, description = text.split("\n\n")[:2]
    assert usage.startswith("usage: ") and "--config" in usage and len(usage.splitlines()) == 1
    assert description.split()[0] in ("Train", "Compression:")
    titles = re.findall(r"^(\S[^\n]*):\n  ", text, re.M)
    assert titles[0] == "help and config files" and titles[-3].startswith("training: this toolkit")
    assert titles[-2].startswith("training: transformers' TrainingArguments, the common ones")
    assert titles[-1] == "examples"
    if main is train_actor.main:
        assert titles[1:5] == ["model", "latent method: the head", "latent method: the loss", "data"]
        assert "--plan_similarity_weight" in _options(text, "latent method: the loss")
        assert "--max_seq_length (--model_max_length)" in text
    assert "--num_train_epochs" in text and "--adam_beta1" not in text  # the rest: --help-all
    assert len(text.splitlines()) < 400


def test_help_lists_what_the_parser_parses_and_the_real_defaults(capsys):
    """The fast help (no TrainingArguments import) shows our options exactly as --help-all (the real parser's
    classes) does, and transformers' common options with their real defaults."""
    from transformers import TrainingArguments

    assert train_actor.main(["--help"]) == 0
    fast = capsys.readouterr().out
    assert train_actor.main(["--help-all"]) == 0
    full = capsys.readouterr().out
    for section in ("model", "latent method: the head", "latent method: the loss", "data",
                    "training: this toolkit's options and changed defaults"):
        assert _options(fast, section) == _options(full, section), section
    assert "--adam_beta1" in _options(full, "training: transformers' TrainingArguments")
    parser_options = train_actor.COMMAND_LINE.argument_types()
    listed = set(_options(full, "training: transformers' TrainingArguments"))
    listed |= {o for s in ("model", "latent method: the head", "latent method: the loss", "data",
                           "training: this toolkit's options and changed defaults") for o in _options(full, s)}
    every = {f"--{f.name}" for t in parser_options for f in dataclasses.fields(t) if f.init}
    assert every <= listed  # --help-all lists every option the parser takes
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    common = cli.training_arguments_from_source(cli.COMMON_TRAINING_ARGUMENTS)
    assert set(common) == set(cli.COMMON_TRAINING_ARGUMENTS)
    for name, (_, default, _) in common.items():
        assert default == repr(defaults[name]) or defaults[name] is dataclasses.MISSING, name
        assert f"--{name}" in _options(fast, "training: transformers' TrainingArguments, the common ones "
                                             "(all of them: --help-all)")


@pytest.mark.parametrize("script", ["train_actor.py", "sender/train.py"])
def test_help_imports_neither_torch_nor_the_trainer(script):
    code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({os.path.join(ROOT, script)!r}, run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "heavy = ('torch', 'transformers.training_args', 'datasets')\n"
            "print('heavy:', sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("heavy: []"), out.stdout[-300:]


# ---------------------------------------------------------------------------------------------
# Config files: bounded, one line, never a hang
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def alarm():
    """Fail instead of hanging: a blocked open() (a FIFO) is interrupted after `seconds`."""
    def handler(signum, frame):
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, handler)
    yield lambda seconds: signal.alarm(seconds)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_as_config_is_refused_not_waited_on(tmp_path, alarm, capsys):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    alarm(20)
    err = _error(train_actor.main, [str(fifo), "--output_dir", "o"], capsys)
    assert f"{fifo}: is not a regular file" in err
    err = _error(train_actor.main, ["--config", "/dev/zero", "--output_dir", "o"], capsys)
    assert "/dev/zero: is not a regular file" in err


def test_a_config_file_is_read_to_a_bound(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("learning_rate: 1.0e-4\n" + "# padding\n" * (cli.MAX_CONFIG_BYTES // 10 + 1))
    assert "larger than 1 MiB" in _error(train_actor.main, [str(big), "--output_dir", "o"], capsys)


@pytest.mark.parametrize("suffix, text", [(".yaml", "learning_rate: " + "[" * 20000 + "]" * 20000),
                                          (".json", '{"learning_rate": ' + "[" * 200000 + "]" * 200000 + "}")])
def test_deeply_nested_config_is_one_line(suffix, text, tmp_path, capsys):
    config = tmp_path / f"deep{suffix}"
    config.write_text(text)
    err = _error(train_actor.main, [str(config), "--output_dir", "o"], capsys)
    assert "nested too deeply" in err or "not valid" in err


def test_a_yaml_alias_bomb_under_a_known_key_is_one_short_line(tmp_path, alarm, capsys):
    lines = ["fsdp_config:", "  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    names = "abcdefgh"
    lines += [f"  {n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip(names, names[1:])]
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(lines) + "\n")  # 9^8 = 43 million strings once expanded
    alarm(60)
    err = _error(train_actor.main, [str(config), "--output_dir", "o"], capsys)
    assert "fsdp_config: more than 10000 values" in err and len(err) < 300


@pytest.mark.parametrize("value", [".nan", "-1.0e-4", ".inf"])
def test_a_nan_or_negative_learning_rate_is_refused(value, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"learning_rate: {value}\nhead_warm_start_lr: 1.0e-3\n")
    err = _error(train_actor.main, [str(config), "--output_dir", "o"], capsys)
    assert err.startswith("error: --learning_rate ") and "expected a finite number >= 0" in err
    config.write_text(f"learning_rate: {value}\n")
    err = _error(train_sender.main, [str(config), "--output_dir", "o"], capsys)
    assert err.startswith("error: --learning_rate ")


def test_yaml_booleans_given_to_word_choices(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("save_strategy: no\neval_strategy: no\noutput_dir: o\n")  # YAML 1.1: `no` is false
    _, _, args = train_actor.parse_args([str(config)])
    assert args.save_strategy == "no" and args.eval_strategy == "no"
    config.write_text("lr_scheduler_type: yes\noutput_dir: o\n")
    err = _error(train_actor.main, [str(config)], capsys)
    assert 'quote the value, e.g. lr_scheduler_type: "yes"' in err


def test_help_in_a_config_file_is_not_a_setting(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("help: true\nlearning_rate: 1.0e-4\n")
    assert "`help` is not a setting" in _error(train_actor.main, [str(config), "--output_dir", "o"], capsys)
    config.write_text("config: other.yaml\n")
    assert "`config` is not a setting" in _error(train_actor.main, [str(config), "--output_dir", "o"], capsys)


def test_training_without_output_dir_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """transformers 5 would write `trainer_output/` into the working folder; a run must say where it goes."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 1\nreport_to: none\n")
    err = _error(train_actor.main, [str(config), "--train_file", "t.jsonl"], capsys)
    assert "--output_dir is required" in err
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]
    _, _, args = train_actor.parse_args(["--train_file", "t.jsonl", "--validate_only", "true"])  # nothing written
    assert args.validate_only


def test_a_json_config_still_reads_lists_and_mappings(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"report_to": ["tensorboard"], "fsdp_config": {"version": 2}, "output_dir": "o"}))
    _, _, args = train_actor.parse_args([str(config)])
    assert args.report_to == ["tensorboard"] and args.fsdp_config.get("version") == 2
