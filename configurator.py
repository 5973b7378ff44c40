"""
Overrides the globals of a script (train.py, sample.py, bench.py) from the command line, in nanoGPT's manner:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Positional arguments are Python files run in order, then `--key=value` (parsed with ast.literal_eval, else kept as a
string; a bare `--flag` sets a bool). Unlike nanoGPT's it checks: an unknown key is an error naming the closest known
one, and a value must have its default's type (an int passes for a float; a None default accepts anything).
Also here: train.py's checks of its settings.
"""

import ast
import difflib
import os
import re
import sys
import traceback
import types



class ConfigError(ValueError):
    pass


def _unknown(key, known):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _check_type(key, value, default, source):
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    raise ConfigError(f"{source}: {key}={value!r} is a {type(value).__name__}, expected {type(default).__name__} "
                      f"(default {default!r})")


def apply(config, argv, skip_unknown_in_files=False, given=None):
    """Updates the dict `config` (a script's globals, filtered to its hyperparameters) from argv; returns it.
    skip_unknown_in_files lets a script with fewer knobs (bench.py, sample.py) read train.py's config files.
    `given`, a set, receives the keys argv sets: every --key, and the keys a file changes (a resumed run takes the
    others from its checkpoint). --help (or -h) prints the settings (usage) and exits."""
    given = set() if given is None else given
    if "--help" in argv or "-h" in argv:
        print(usage(sys.argv[0], config))
        raise SystemExit(0)
    defaults = dict(config)
    for arg in argv:
        if not arg.startswith("--"):
            # a config file: run it in a namespace that starts as the current config, so it may read earlier values
            namespace = {**config, "__file__": os.path.abspath(arg)}  # a file may build on a sibling
            try:
                with open(arg) as f:
                    code = compile(f.read(), arg, "exec")
            except FileNotFoundError:
                hint = f"; a setting is given as --{arg}" if "=" in arg and arg.split("=")[0].isidentifier() else ""
                raise ConfigError(f"config file not found: {arg}{hint}") from None
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"config file {arg} cannot be read: {e}") from None
            except SyntaxError as e:
                raise ConfigError(f"{arg}, line {e.lineno}: syntax error: {e.msg}; fix the file "
                                  f"(a config file is Python: key = value lines)") from None
            try:
                exec(code, namespace)
            except Exception as e:  # the file's own line, not configurator's
                line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                             if f.filename == arg), "?")
                raise ConfigError(f"{arg}, line {line}: {type(e).__name__}: {e}") from None
            for key, value in namespace.items():
                if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    continue
                if key not in defaults:
                    if skip_unknown_in_files:
                        continue
                    raise _unknown(key, list(defaults)) from None
                value = _check_type(key, value, defaults[key], arg)
                if value != config[key]:
                    given.add(key)
                config[key] = value
        else:
            key, sep, text = arg[2:].partition("=")  # partition: the value itself may contain '='
            if key not in defaults:
                raise _unknown(key, list(defaults))
            if not sep:  # a bare --flag switches a bool on (--compile); anything else needs a value
                if not isinstance(defaults[key], bool):
                    raise ConfigError(f"expected --key=value, got '{arg}'")
                text = "True"
            if isinstance(defaults[key], str):
                value = text  # --run_name=123 stays a string
            else:
                try:
                    value = ast.literal_eval(text)
                except (SyntaxError, ValueError):
                    value = text
            config[key] = _check_type(key, value, defaults[key], "command line")
            given.add(key)
    return config


def usage(script, config):
    """What --help prints: each setting of `config` with its default and the comment beside it in the script, under
    the script's own headings, then the model's (GPTConfig's fields, commented in model.py) when it takes them."""
    model_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.py")
    out, done = [f"usage: python {os.path.basename(script)} [CONFIG_FILE ...] [--key=value ...]", ""], set()
    for path, title in ((script, []), (model_py, ["model settings (GPTConfig, model.py)"])):
        shown, continuing = [], False
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"( *)(\w+)\s*(?::\s*[\w.\[\], ]+)?\s*=\s*[^=].*?(?:#\s*(.*))?$", line)
                if m and m.group(2) in config and m.group(2) not in done and (path == script) == (m.group(1) == ""):
                    done.add(m.group(2))
                    shown.append(f"  --{m.group(2)}={config[m.group(2)]!r}" + f"  {m.group(3)}" * bool(m.group(3)))
                    continuing = True
                elif continuing and re.match(r"\s+# ", line):  # a setting's comment, continued
                    shown.append(" " * 8 + line.strip()[2:])
                else:
                    continuing = False
                    if path == script and re.match(r"# [A-Za-z]", line) and not line.startswith("# ---"):
                        shown.append(line.strip())  # a heading of the script's settings (# I/O, # data, ...)
        keep, settings_follow = [], False  # headings only where settings follow them
        for s in reversed(shown):
            if not s.startswith("#") or settings_follow:
                keep.append(s)
            settings_follow = settings_follow or not s.startswith("#")
        shown = keep[::-1]
        if any(s.startswith("  --") for s in shown):
            out += title + shown + [""]
    return "\n".join(out).rstrip()


def hyperparameters(namespace):
    """The names in a script's globals that are hyperparameters: plain values, not modules, functions or _private."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))}


def check_training(config):
    """ConfigError naming the first of train.py's settings that cannot work (the model's own: GPTConfig)."""
    c = types.SimpleNamespace(**config)
    for name in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "log_interval",
                 "eval_iters", "keep_last", "tp_size"):
        if config[name] < 1:
            raise ConfigError(f"{name} must be at least 1, got {config[name]}")
    for bad, message in [
        (c.max_iters < 0, f"max_iters must be >= 0, got {c.max_iters}"),
        (c.warmup_iters < 0, f"warmup_iters must be >= 0, got {c.warmup_iters}"),
        (not c.learning_rate > 0, f"learning_rate must be > 0, got {c.learning_rate}"),
        (c.min_lr < 0, f"min_lr must be >= 0, got {c.min_lr}"),
        (c.weight_decay < 0, f"weight_decay must be >= 0, got {c.weight_decay}"),
        (not (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1), f"beta1 and beta2 must be in [0, 1), got {c.beta1}, {c.beta2}"),
        (c.grad_clip < 0, f"grad_clip must be >= 0 (0 disables clipping), got {c.grad_clip}"),
        (c.lr_schedule not in ("cosine", "wsd"), f"lr_schedule must be 'cosine' or 'wsd', got {c.lr_schedule!r}"),
        (c.decay_lr and c.lr_decay_iters < 1,
         f"lr_decay_iters must be at least 1 (or decay_lr=False), got {c.lr_decay_iters}"),
        (c.decay_lr and c.warmup_iters > c.lr_decay_iters,
         f"warmup_iters={c.warmup_iters} exceeds lr_decay_iters={c.lr_decay_iters}: the learning rate would drop "
         f"from its peak to min_lr at once; set warmup_iters below lr_decay_iters (or decay_lr=False)"),
        (c.lr_schedule == "wsd" and not 0 < c.cooldown_frac <= 1,
         f"cooldown_frac must be in (0, 1], got {c.cooldown_frac}"),
        (c.optimizer not in ("adamw", "muon"), f"optimizer must be 'adamw' or 'muon', got {c.optimizer!r}"),
        (c.mode not in ("pretrain", "sft", "dpo"), f"mode must be 'pretrain', 'sft' or 'dpo', got {c.mode!r}"),
        (c.dpo_beta <= 0, f"dpo_beta must be > 0, got {c.dpo_beta}"),
        (c.moe_bias_rate < 0, f"moe_bias_rate must be >= 0, got {c.moe_bias_rate}"),
        (c.backend not in ("auto", "nccl", "gloo"), f"backend must be 'auto', 'nccl' or 'gloo', got {c.backend!r}"),
        (c.stop_grace <= 0, f"stop_grace must be > 0 seconds, got {c.stop_grace}"),
        (c.save_timeout <= 0, f"save_timeout must be > 0 seconds, got {c.save_timeout}"),
        (c.peak_flops < 0, f"peak_flops must be >= 0 (0 measures it), got {c.peak_flops}"),
        (c.fsdp_cpu_offload and "fsdp" not in c.parallel, "fsdp_cpu_offload=True needs parallel='fsdp' or 'fsdp+tp'"),
        (c.pp_size > 1 and c.mode != "pretrain",
         f"pp_size > 1 trains mode='pretrain' only (not {c.mode!r}): its loss is per token of fixed-length sequences"),
        (os.path.isfile(c.out_dir), f"out_dir={c.out_dir!r} is a file; point out_dir at a directory (new, or a run's)"),
    ]:
        if bad:
            raise ConfigError(message)
