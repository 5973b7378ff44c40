"""The presets in config/ build, and each size preset has the parameter count its name promises."""
import os

import pytest
import torch

import configurator
from conftest import ROOT
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


def test_every_config_file_is_accepted_by_train_py():
    # train.py's own check: unknown keys and wrong types fail; run it on each preset with a key that stops early
    import subprocess
    import sys
    for name in sorted(os.listdir(os.path.join(ROOT, "config"))):
        if not name.endswith(".py"):
            continue
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), os.path.join("config", name),
                               "--dataset=__no_such_dataset__"], cwd=ROOT, capture_output=True, text=True)
        # the config is accepted (printed) and the run stops at the missing data, not at the config
        assert "config:" in proc.stdout, (name, proc.stdout[-500:], proc.stderr[-500:])
        assert "prepare.py" in proc.stderr, (name, proc.stderr[-500:])
