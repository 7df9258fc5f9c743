"""common/run_config.py: --config TOML files checked against the argparse flags, the TOML writer, and the
resume-compatibility check. (Repeating a whole run from its run_config.toml is in test_train_emotion.py.)"""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from common.run_config import check_resume_config, parse_args_with_config, read_config, to_toml


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo.py")
    p.add_argument("--config")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="peak rate")
    p.add_argument("--max_train_steps", type=int, help="steps")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--output_dir", default="out")
    p.add_argument("--eval_only", action="store_true")
    return p


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_config_values_and_command_line_overrides(tmp_path):
    path = write(tmp_path, '# a comment\nlearning_rate = 3e-4\nmax_train_steps = 50\nmixed_precision = "bf16"\n'
                           'eval_only = true\n')
    args = parse_args_with_config(parser(), ["--config", path])
    assert (args.learning_rate, args.max_train_steps, args.mixed_precision, args.eval_only) == (3e-4, 50, "bf16", True)
    args = parse_args_with_config(parser(), ["--config", path, "--learning_rate", "1e-2"])
    assert args.learning_rate == 1e-2 and args.max_train_steps == 50
    assert parse_args_with_config(parser(), ["--config", write(tmp_path, "learning_rate = 1\n")]).learning_rate == 1.0


@pytest.mark.parametrize("text, message", [
    ("max_train_steps = 5\nlerning_rate = 0.1\n", "line 2: unknown key 'lerning_rate'"),
    ("learning_rate = 0.1\n\nmax_train_steps = 2.5\n", "line 3: key 'max_train_steps': expected an integer"),
    ('learning_rate = "fast"\n', "line 1: key 'learning_rate': expected a number"),
    ("eval_only = 1\n", "line 1: key 'eval_only': expected true or false"),
    ('mixed_precision = "fp8"\n', "line 1: key 'mixed_precision': 'fp8' is not one of no, fp16, bf16"),
    ("[training]\nlearning_rate = 0.1\n", "line 1: [training] is a table"),
    ("learning_rate = = 1\n", "not valid TOML"),
])
def test_bad_config_names_key_and_line(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as e:
        parse_args_with_config(parser(), ["--config", path])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and path in err


def test_unknown_key_suggests_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args_with_config(parser(), ["--config", write(tmp_path, "lerning_rate = 0.1\n")])
    assert "did you mean 'learning_rate'?" in capsys.readouterr().err


def test_written_config_reads_back_to_the_same_args(tmp_path):
    p = parser()
    args = p.parse_args(["--learning_rate", "0.1", "--output_dir", 'we"ird\\path\tü', "--eval_only"])
    text = to_toml(args, p, header="header line")
    assert text.startswith("# header line\n") and "# max_train_steps =   (not set)" in text
    assert "config" not in tomllib.loads(text)
    again = parse_args_with_config(parser(), ["--config", write(tmp_path, text)])
    assert vars(again) == {**vars(args), "config": str(tmp_path / "run.toml")}


def test_resume_check_lists_differences():
    saved = {"learning_rate": 1e-3, "seed": 0, "output_dir": "a"}
    now = {"learning_rate": 2e-3, "seed": 0, "output_dir": "b"}
    keys = ("learning_rate", "seed")
    with pytest.raises(ValueError, match=r"learning_rate: checkpoint 0.001, now 0.002"):
        check_resume_config(saved, now, keys, checkpoint="ck.pt", allow_change=False)
    assert check_resume_config(saved, now, keys, checkpoint="ck.pt", allow_change=True) == [
        "  learning_rate: checkpoint 0.001, now 0.002"]
    assert check_resume_config(saved, {**saved, "output_dir": "c"}, keys, checkpoint="ck.pt", allow_change=False) == []
    # a setting newer than the checkpoint (not in its record) is not compared; one it records is
    newer = keys + ("cache_latents",)
    assert check_resume_config(saved, {**saved, "cache_latents": False}, newer, checkpoint="ck.pt",
                               allow_change=False) == []
    with pytest.raises(ValueError, match=r"cache_latents: checkpoint False, now True"):
        check_resume_config({**saved, "cache_latents": False}, {**saved, "cache_latents": True}, newer,
                            checkpoint="ck.pt", allow_change=False)


def test_example_config_is_valid():
    import train_emotion
    example = Path(train_emotion.__file__).parent / "configs" / "train_emotion.example.toml"
    args = parse_args_with_config(train_emotion.build_parser(), ["--config", str(example)])
    assert args.preset == "b16" and args.class_weighting == "balanced" and args.learning_rate == 2e-5


def test_train_emotion_rejects_a_bad_config_before_any_work(tmp_path, capsys):
    import train_emotion
    bad = tmp_path / "bad.toml"
    bad.write_text('seed = 1\ntrain_batch_size = "big"\n')
    with pytest.raises(SystemExit):
        train_emotion.main(["--config", str(bad), "--output_dir", str(tmp_path / "out")])
    assert "line 2: key 'train_batch_size': expected an integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_repeatable_flag_round_trips_as_a_list(tmp_path):
    """sample.py --lora FILE[:SCALE] repeats; its run_config.toml holds a list that reads back."""
    p = argparse.ArgumentParser(prog="demo.py")
    p.add_argument("--lora", action="append")
    p.add_argument("--config")
    args = p.parse_args(["--lora", "a.safetensors:0.5", "--lora", "b.safetensors"])
    (tmp_path / "run.toml").write_text(to_toml(args, p))
    assert read_config(tmp_path / "run.toml", p) == {"lora": ["a.safetensors:0.5", "b.safetensors"]}
    (tmp_path / "bad.toml").write_text('lora = "a.safetensors"\n')
    with pytest.raises(SystemExit):
        read_config(tmp_path / "bad.toml", p)
