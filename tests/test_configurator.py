"""configurator.apply: config files then --key=value overrides, every key and type checked."""

import os

import pytest

import configurator
from configurator import ConfigError
from conftest import run_script


def defaults():
    return {
        "learning_rate": 6e-4,
        "max_iters": 1000,
        "batch_size": 12,
        "compile": False,
        "wandb_run_name": "run",
        "init_path": None,
    }


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_no_arguments_leaves_defaults_unchanged():
    assert configurator.apply(defaults(), []) == defaults()


def test_unknown_command_line_key_is_an_error_naming_it_and_the_closest_known_key():
    with pytest.raises(ConfigError) as err:
        configurator.apply(defaults(), ["--learnin_rate=0.1"])
    message = str(err.value)
    assert "learnin_rate" in message
    assert "did you mean 'learning_rate'" in message


def test_unknown_key_in_config_file_is_an_error_naming_it_and_the_closest_known_key(tmp_path):
    path = write(tmp_path, "cfg.py", "batch_size = 4\nmax_iter = 10\n")
    with pytest.raises(ConfigError) as err:
        configurator.apply(defaults(), [path])
    message = str(err.value)
    assert "max_iter" in message
    assert "did you mean 'max_iters'" in message


def test_unknown_key_far_from_every_known_key_gets_no_suggestion():
    with pytest.raises(ConfigError, match="zzzzzz") as err:
        configurator.apply(defaults(), ["--zzzzzz=1"])
    assert "did you mean" not in str(err.value)


def test_config_files_run_in_order_and_command_line_overrides_them(tmp_path):
    first = write(tmp_path, "first.py", "batch_size = 4\nmax_iters = 10\nlearning_rate = 1e-3\n")
    second = write(tmp_path, "second.py", "batch_size = 8\n")
    config = configurator.apply(defaults(), [first, second, "--max_iters=20"])
    assert config["batch_size"] == 8        # the later file wins
    assert config["max_iters"] == 20        # the command line wins over both files
    assert config["learning_rate"] == 1e-3  # untouched by later arguments
    assert config["compile"] is False       # untouched by any argument


def test_later_command_line_value_overrides_earlier_one_and_a_file_after_it(tmp_path):
    path = write(tmp_path, "cfg.py", "batch_size = 64\n")
    config = configurator.apply(defaults(), ["--batch_size=2", path, "--max_iters=3", "--max_iters=5"])
    assert config["batch_size"] == 64  # arguments apply left to right
    assert config["max_iters"] == 5


def test_config_file_sees_values_set_before_it_and_may_import_modules(tmp_path):
    first = write(tmp_path, "first.py", "batch_size = 5\n")
    second = write(tmp_path, "second.py", "import math\nbatch_size = batch_size * 2\nmax_iters = math.floor(7.9)\n")
    config = configurator.apply(defaults(), [first, second])
    assert config["batch_size"] == 10
    assert config["max_iters"] == 7
    assert "math" not in config


def test_int_is_accepted_for_a_float_default_and_becomes_float(tmp_path):
    config = configurator.apply(defaults(), ["--learning_rate=1"])
    assert config["learning_rate"] == 1.0 and type(config["learning_rate"]) is float
    path = write(tmp_path, "cfg.py", "learning_rate = 2\n")
    config = configurator.apply(defaults(), [path])
    assert config["learning_rate"] == 2.0 and type(config["learning_rate"]) is float


def test_values_are_parsed_as_python_literals():
    config = configurator.apply(defaults(), ["--compile=True", "--learning_rate=3e-4", "--max_iters=7"])
    assert config["compile"] is True
    assert config["learning_rate"] == 3e-4
    assert config["max_iters"] == 7 and type(config["max_iters"]) is int


@pytest.mark.parametrize("arg", [
    "--max_iters=abc",     # str for an int
    "--max_iters=1.5",     # float for an int
    "--max_iters=True",    # bool for an int (bool is an int subclass: must still be refused)
    "--compile=1",         # int for a bool
    "--compile=yes",       # str for a bool
    "--learning_rate=True",  # bool for a float
    "--learning_rate=fast",  # str for a float
])
def test_command_line_value_of_the_wrong_type_is_rejected(arg):
    key = arg[2:].split("=")[0]
    with pytest.raises(ConfigError, match=key):
        configurator.apply(defaults(), [arg])


def test_config_file_value_of_the_wrong_type_is_rejected(tmp_path):
    path = write(tmp_path, "cfg.py", "compile = 'no'\n")
    with pytest.raises(ConfigError, match="compile"):
        configurator.apply(defaults(), [path])


def test_none_default_accepts_any_value():
    assert configurator.apply(defaults(), ["--init_path=ckpt.pt"])["init_path"] == "ckpt.pt"
    assert configurator.apply(defaults(), ["--init_path=3"])["init_path"] == 3
    assert configurator.apply(defaults(), ["--init_path=[1, 2]"])["init_path"] == [1, 2]


def test_value_containing_equals_sign_is_kept_whole():
    assert configurator.apply(defaults(), ["--wandb_run_name=a=b"])["wandb_run_name"] == "a=b"
    assert configurator.apply(defaults(), ["--init_path=x=1"])["init_path"] == "x=1"


def test_str_default_keeps_numeric_looking_value_as_string():
    config = configurator.apply(defaults(), ["--wandb_run_name=123"])
    assert config["wandb_run_name"] == "123"
    config = configurator.apply(defaults(), ["--wandb_run_name=True"])
    assert config["wandb_run_name"] == "True"


def test_missing_config_file_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nope.py")
    with pytest.raises(ConfigError, match="not found") as err:
        configurator.apply(defaults(), [missing])
    assert missing in str(err.value)


def test_bare_flag_switches_a_bool_on_and_is_an_error_for_other_types():
    assert configurator.apply(defaults(), ["--compile"])["compile"] is True
    with pytest.raises(ConfigError, match="--key=value") as err:
        configurator.apply(defaults(), ["--batch_size"])
    assert "--batch_size" in str(err.value)


def test_hyperparameters_keeps_plain_values_and_drops_modules_functions_and_private_names():
    namespace = {"lr": 1.0, "name": "x", "flag": True, "n": 3, "none": None, "_private": 1,
                 "os": os, "fn": lambda: 0, "cls": int, "lst": [1]}
    assert configurator.hyperparameters(namespace) == {"lr": 1.0, "name": "x", "flag": True, "n": 3, "none": None}


@pytest.mark.parametrize("script, line", [
    ("train.py", "  --max_iters=600000  total optimizer steps"),
    ("sample.py", "  --top_p=1.0  sample from the smallest set of tokens holding this much probability; 1.0 disables"),
    ("serve.py", "  --busy_wait=60.0  seconds a request waits while another generation runs, then 503"),
    ("bench.py", "  --n_layer=12"),
])
def test_help_lists_every_setting_with_its_default_and_comment_and_exits_0(script, line, tmp_path):
    """N1: --help, the first thing a newcomer types, lists the settings (the model's too where the script takes
    them) under the file's own headings, and exits 0 having touched nothing."""
    proc = run_script(script, ["--help"], tmp_path, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert line in proc.stdout.splitlines(), proc.stdout
    assert list(tmp_path.iterdir()) == []
    if script == "train.py":
        lines = proc.stdout.splitlines()
        assert lines.index("# optimizer") < lines.index("  --learning_rate=0.0006  peak learning rate")
        assert "  --n_expert=0" in lines and "model settings (GPTConfig, model.py)" in lines
        # every setting train.py takes is listed once
        listed = [s.split("=")[0][4:] for s in lines if s.startswith("  --")]
        assert sorted(listed) == sorted(set(listed)) and len(listed) > 80


def test_a_setting_without_its_dashes_is_answered_with_the_form_that_works():
    """N5: `max_iters=200` is read as a config file; the error says to write --max_iters=200."""
    with pytest.raises(ConfigError, match=r"config file not found: max_iters=200; a setting is given as "
                                          r"--max_iters=200$"):
        configurator.apply(defaults(), ["max_iters=200"])
