"""The presets in config/ build, and each size preset has the parameter count its name promises."""
import os

import pytest
import torch

import configurator
from conftest import ROOT, run_script
from model import GPT, GPTConfig

SIZES = {"tiny.py": 125e6, "small.py": 350e6, "medium.py": 760e6, "large.py": 1.3e9, "xl.py": 2.7e9}


def model_args(*files):
    """The model shape after applying config files, starting from GPTConfig's defaults."""
    defaults = {"n_layer": 0, "n_head": 0, "n_embd": 0, "learning_rate": 0.0, "min_lr": 0.0}
    cfg = configurator.apply(dict(defaults), [os.path.join(ROOT, "config", f) for f in files],
                             skip_unknown_in_files=True)
    return {k: cfg[k] for k in ("n_layer", "n_head", "n_embd")}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_size_preset_parameter_count_matches_its_name(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = GPT(GPTConfig(**model_args(name)))
    n = model.num_params(non_embedding=False)
    assert abs(n / SIZES[name] - 1) <= 0.10, f"{name}: {n / 1e6:.0f}M parameters"


def train_py_settings():
    """train.py's settings with their defaults, read from its source as train.py builds them: its top-level
    assignments of plain values up to `config_keys`, then GPTConfig's fields (but vocab_size: it is the data's)."""
    import ast
    with open(os.path.join(ROOT, "train.py")) as f:
        tree = ast.parse(f.read())
    settings = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "config_keys":
                break
            try:
                settings[node.targets[0].id] = eval(compile(ast.Expression(node.value), "train.py", "eval"), {})
            except NameError:  # computed from something else: not a setting
                pass
    settings.update({k: v for k, v in GPTConfig.defaults().items() if k not in settings and k != "vocab_size"})
    return configurator.hyperparameters(settings)


def test_the_settings_read_here_are_those_train_py_prints_for_help():
    proc = run_script("train.py", ["--help"], ROOT)
    shown = {line.split("=")[0].strip()[2:] for line in proc.stdout.splitlines() if line.startswith("  --")}
    assert proc.returncode == 0 and shown == set(train_py_settings()), shown ^ set(train_py_settings())


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ROOT, "config")) if n.endswith(".py")))
def test_every_config_file_passes_train_py_checks(name):
    # what train.py does with a config file before it reads data: unknown keys and wrong types fail in apply, settings
    # that cannot work in check_training and GPTConfig's own checks
    config = configurator.apply(train_py_settings(), [os.path.join(ROOT, "config", name)])
    configurator.check_training(config)
    GPTConfig.from_settings(config)
