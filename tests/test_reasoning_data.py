"""data/reasoning/prepare.py and the reasoning benchmark: the generator's answers and difficulties agree with solvers
written here, training data stays below the test set's hardest problems, the files are what train.py and bench.py
read, and bench.py reasoning runs end to end on a tiny model (DRE and dense)."""
import importlib.util
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
from conftest import ROOT, run_script, run_train

PREPARE = os.path.join(ROOT, "data", "reasoning", "prepare.py")
spec = importlib.util.spec_from_file_location("reasoning_prepare", PREPARE)
prep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prep)


def parse(assignments):
    table = {}
    for statement in assignments.rstrip(";").split(";"):
        name, value = statement.split("=")
        assert len(name) == 1 and len(value) == 1 and name not in table, f"{statement} in {assignments}"
        table[name] = value
    return table


def chase(table, x):
    """An independent solver: (digit, hops) by following x's assignments to a digit."""
    hops = 0
    while not x.isdigit():
        x, hops = table[x], hops + 1
        assert hops <= len(table), "a cycle"
    return x, hops


def solve_pointer(prompt):  # a test prompt: assignments, '|', the letter asked
    body, query = prompt.split("|")
    return chase(parse(body), query)


def add(prompt):
    a, b = prompt[:-1].split("+")
    return str(int(a) + int(b))[::-1], max(len(a), len(b))


@pytest.mark.parametrize("depth", [1, 2, 4, 7, 10])
def test_pointer_answers_and_depths_match_an_independent_solver(depth):
    rng = random.Random(depth)
    for _ in range(200):
        text, heads, letters = prep.pointer_problem(rng, depth, chains=4, distractor_max=3)
        table = parse(text[:-1])
        assert sorted(letters) == sorted(table)
        assert chase(table, heads[0][0]) == heads[0][1:] == (heads[0][1], depth)
        # the heads are exactly the letters no assignment refers to, and each is its chain's far end
        assert {h for h, _, _ in heads} == set(table) - set(table.values())
        assert all(chase(table, h) == (v, d) for h, v, d in heads)
        assert all(1 <= d <= 3 for _, _, d in heads[1:])  # distractors stay inside the training range
        # four chains with four distinct digits at every depth: guessing a digit of the problem is right 1 in 4
        assert len({v for v in table.values() if v.isdigit()}) == len(heads) == 4


def test_pointer_chains_are_shuffled_and_letters_differ_from_the_previous_problem():
    rng, avoid, firsts = random.Random(0), "", set()
    for _ in range(300):
        text, _, letters = prep.pointer_problem(rng, 4, 4, 4, avoid)
        assert not set(letters) & set(avoid)
        firsts.add(text[2].isdigit())  # does the first assignment hold a digit? both happen
        avoid = letters
    assert firsts == {True, False}
    with pytest.raises(ValueError, match="depth"):
        prep.pointer_problem(rng, 0, 4, 4)
    with pytest.raises(ValueError, match="letters"):
        prep.pointer_problem(rng, 50, 4, 4)


@pytest.mark.parametrize("digits", [1, 3, 8, 16])
def test_addition_answers_and_digits_match(digits):
    rng = random.Random(digits)
    for _ in range(200):
        prompt, answer = prep.addition_problem(rng, digits)
        assert add(prompt) == (answer, digits)


def decode_lines(path, chars):
    text = "".join(chars[i] for i in np.fromfile(path, dtype=np.uint16))
    assert text.endswith("\n")
    return text[:-1].split("\n")


def check_line(task, line):
    """The difficulties of a training line's answers, each checked against the solvers."""
    if task == "addition":
        prompt, answer = line.split("=")
        got, d = add(prompt + "=")
        assert got == answer
        return [d]
    body, asked = line.split("|")
    table = parse(body)
    assert sorted(asked[::2]) == sorted(set(table) - set(table.values()))  # every head, once
    depths = []
    for h, v in zip(asked[::2], asked[1::2]):
        got, d = chase(table, h)
        assert got == v
        depths.append(d)
    return depths


@pytest.mark.parametrize("task,train_max,solver", [("pointer", 3, solve_pointer), ("addition", 4, add)])
def test_prepare_splits_by_difficulty_and_writes_what_bench_reads(tmp_path, task, train_max, solver):
    args = [sys.executable, PREPARE, f"--task={task}", f"--train_max={train_max}", "--train_problems=500",
            "--val_problems=50", "--test_per=20", f"--out_dir={tmp_path}"]
    subprocess.run(args, check=True, capture_output=True)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["vocab_size"] == len(meta["chars"]) and meta["train_max"] == train_max
    for split, n in (("train", 500), ("val", 50)):
        lines = decode_lines(tmp_path / f"{split}.bin", meta["chars"])
        assert len(lines) == n
        difficulties = {d for line in lines for d in check_line(task, line)}
        assert difficulties == set(range(1, train_max + 1)), split  # every training difficulty, none harder
        mask = np.fromfile(tmp_path / f"{split}_mask.bin", dtype=np.uint8)
        start = 0
        for line in lines:  # the loss falls on the answers: the digit after each head asked, or the sum and '\n'
            body, asked = line.split("|" if task == "pointer" else "=")
            answers = {len(body) + 2 + 2 * i for i in range(len(asked) // 2)} if task == "pointer" else \
                set(range(len(body) + 1, len(line) + 1))
            assert set(np.flatnonzero(mask[start:start + len(line) + 1])) == answers, line
            start += len(line) + 1
        assert start == len(mask)
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert [t["difficulty"] for t in test] == [d for d in range(1, 2 * train_max + 1) for _ in range(20)]
    assert all(solver(t["prompt"]) == (t["answer"], t["difficulty"]) for t in test)
    select = [json.loads(line) for line in (tmp_path / "select.jsonl").read_text().splitlines()]
    assert {s["difficulty"] for s in select} == set(range(1, 2 * train_max + 1))  # B7: a choice set of every kind,
    assert not {s["prompt"] for s in select} & {t["prompt"] for t in test}  # and none of the test's problems
    assert all(solver(s["prompt"]) == (s["answer"], s["difficulty"]) for s in select)
    again = tmp_path / "again"  # seeded: the same files again
    subprocess.run(args[:-1] + [f"--out_dir={again}"], check=True, capture_output=True)
    for name in ("train.bin", "val.bin", "test.jsonl", "select.jsonl", "train_mask.bin"):
        assert (again / name).read_bytes() == (tmp_path / name).read_bytes()
    subprocess.run(args[:-1] + [f"--out_dir={again}", "--loss=all"], check=True, capture_output=True)
    assert not (again / "train_mask.bin").exists() and not (again / "val_mask.bin").exists()  # no stale mask


def test_pretrain_batch_has_no_loss_outside_the_mask(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)  # a window is found again from its first token
    mask = (np.arange(100) % 3 == 0).astype(np.uint8)
    tokens.tofile(tmp_path / "train.bin")
    mask.tofile(tmp_path / "train_mask.bin")
    x, y = data.pretrain_batch(str(tmp_path / "train.bin"), np.uint16, 8, 10, torch.Generator().manual_seed(0))
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = row_x[0]
        for t in range(10):  # row_y[t] is the target of token start + t, i.e. token start + t + 1
            assert row_y[t] == (tokens[start + t + 1] if mask[start + t + 1] else -1)
    assert (y == -1).any() and (y != -1).any()
    mask[:50].tofile(tmp_path / "train_mask.bin")  # a mask of another file's length is refused, not misaligned
    with pytest.raises(ValueError, match="train_mask.bin has 50 entries for 100 tokens"):
        data.pretrain_batch(str(tmp_path / "train.bin"), np.uint16, 8, 10, torch.Generator().manual_seed(0))


def test_train_weights_set_how_often_each_depth_is_asked_in_training_and_val_stays_even(tmp_path):
    subprocess.run([sys.executable, PREPARE, "--train_max=3", "--train_weights=6,3,1", "--train_problems=2000",
                    "--val_problems=1000", "--test_per=2", f"--out_dir={tmp_path}"], check=True, capture_output=True)
    chars = json.loads((tmp_path / "meta.json").read_text())["chars"]
    for split, expected in (("train", [0.6, 0.3, 0.1]), ("val", [1 / 3] * 3)):
        depths = [d for line in decode_lines(tmp_path / f"{split}.bin", chars) for d in check_line("pointer", line)]
        share = np.bincount(depths, minlength=4)[1:] / len(depths)  # every head asked: the distractors' too
        assert np.abs(share - expected).max() < 0.03, (split, share)


def test_distractor_max_lengthens_training_prompts_without_asking_deeper_heads(tmp_path):
    args = [sys.executable, PREPARE, "--train_max=3", "--train_problems=1000", "--val_problems=50", "--test_per=5"]
    subprocess.run(args + [f"--out_dir={tmp_path}"], check=True, capture_output=True)
    subprocess.run(args + ["--distractor_max=6", f"--out_dir={tmp_path / 'long'}"], check=True, capture_output=True)
    chars = json.loads((tmp_path / "meta.json").read_text())["chars"]
    sizes, asked = [], []
    for line in decode_lines(tmp_path / "long" / "train.bin", chars):
        body, answers = line.split("|")
        table = parse(body)
        heads = set(table) - set(table.values())
        sizes += [chase(table, h)[1] for h in heads]
        asked += [chase(table, h)[1] for h in answers[::2]]
        assert all(chase(table, h)[0] == v for h, v in zip(answers[::2], answers[1::2]))
        assert {h for h in heads if chase(table, h)[1] <= 3} == set(answers[::2])  # every head of 1-3 hops, once
    assert max(sizes) == 6 and set(asked) == {1, 2, 3}  # longer chains in the prompt, never asked
    # the test set does not change: runs with and without it are scored on the same problems
    assert (tmp_path / "long" / "test.jsonl").read_bytes() == (tmp_path / "test.jsonl").read_bytes()
    proc = subprocess.run(args + ["--distractor_max=8", f"--out_dir={tmp_path / 'x'}"], capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: --distractor_max=8")
    assert not (tmp_path / "x" / "train.bin").exists()


def test_prepare_refuses_impossible_settings(tmp_path):
    proc = subprocess.run([sys.executable, PREPARE, "--train_max=5", "--test_max=16", f"--out_dir={tmp_path}"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: --chains=4")
    assert not (tmp_path / "train.bin").exists()
    for weights in ("8,4,2", "1,0,0,x", "0,0,0,0", "1,-1,1,1"):
        proc = subprocess.run([sys.executable, PREPARE, f"--train_weights={weights}", f"--out_dir={tmp_path}"],
                              capture_output=True, text=True)
        assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith(
            f"error: --train_weights={weights} needs 4 numbers"), weights
    assert not (tmp_path / "train.bin").exists()


@pytest.fixture(scope="module")
def reasoning_data(tmp_path_factory):
    work = tmp_path_factory.mktemp("reasoning")
    subprocess.run([sys.executable, PREPARE, "--train_max=2", "--chains=3", "--train_problems=3000",
                    "--val_problems=100", "--test_per=6", f"--out_dir={work / 'data' / 'reasoning'}"],
                   check=True, capture_output=True)
    return work


TINY = ["--dataset=reasoning", "--device=cpu", "--dtype=float32", "--n_layer=3", "--n_head=2", "--n_embd=16",
        "--block_size=32", "--batch_size=4", "--max_iters=3", "--eval_interval=3", "--eval_iters=1",
        "--warmup_iters=1", "--lr_decay_iters=3", "--log_interval=1"]


@pytest.mark.parametrize("dre", [True, False])
def test_bench_reasoning_end_to_end(reasoning_data, dre):
    out = reasoning_data / f"out-{dre}"
    extra = ["--dre=True", "--max_reasoning_steps=3", "--dre_mean_steps=2", "--dre_exit=state",
             "--dre_threshold=0.05"] if dre else []
    run_train([*TINY, *extra, f"--out_dir={out}"], cwd=reasoning_data)
    proc = run_script("bench.py", ["reasoning", f"--out_dir={out}", "--device=cpu", "--rounds=1"], reasoning_data,
                      check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1], parse_constant=lambda c: pytest.fail(f"{c} in the JSON line"))  # strict JSON
    for key in ("id_acc", "ood_acc", "ood_acc_train_steps", "exit_step_ratio", "exit_acc_drop", "exit_speedup"):
        assert isinstance(summary[key], float), key
    for key in ("id_acc", "ood_acc", "ood_acc_train_steps"):
        assert 0 <= summary[key] <= 1
    table = [line.split()[0] for line in lines if line[:1].isdigit() or line.startswith("exit")]
    if dre:  # fixed 1 .. the training maximum of 3, every other count to 4 x the mean of 2 steps, then exit
        assert table == ["1", "2", "3", "5", "7", "8", "exit"]
        rho = summary["rho_steps_difficulty"]
        assert 0 < summary["exit_step_ratio"] <= 1 and (rho is None or -1 <= rho <= 1)
    else:  # a dense model: one row, nothing to exit
        assert table == ["1"] and summary["exit_step_ratio"] == 1.0 and summary["rho_steps_difficulty"] is None


def test_bench_reasoning_refuses_a_missing_test_set_and_a_bad_exit_test(reasoning_data):
    out = reasoning_data / "out-True"
    if not (out / "ckpt.pt").exists():
        run_train([*TINY, "--dre=True", "--max_reasoning_steps=3", "--dre_mean_steps=2", f"--out_dir={out}"],
                  cwd=reasoning_data)
    for arg, message in (("--reasoning_test=nowhere.jsonl", "error: the reasoning test set (nowhere.jsonl"),
                         ("--reasoning_exit=halt", "error: reasoning_exit must be '', 'kl' or 'state'")):
        proc = run_script("bench.py", ["reasoning", f"--out_dir={out}", "--device=cpu", arg], reasoning_data,
                          check=False)
        assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-500:]


def test_ood_acc_is_the_test_accuracy_at_the_step_count_chosen_on_the_selection_problems(monkeypatch):
    """B7: the reported out-of-distribution accuracy is read at the step count that does best on select.jsonl's
    problems, not at the best of the test's own (which flatters it). solve is a stand-in: on the test problems 3
    steps answer everything, on the selection problems 2 do."""
    import evaluation
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=32, vocab_size=16, dre=True, n_coda=0,
                          max_reasoning_steps=4, dre_mean_steps=2.0))
    test = [{"difficulty": d, "ids": [1, 2], "target": [3], "answer_at": (0, 1)} for d in (1, 2, 3, 4)]
    select = [dict(p) for p in test]

    def solve(model, problems, steps=None, threshold=None, batch_size=256):
        return [steps == (2 if problems is select else 3)] * len(problems), [float(steps)] * len(problems)

    monkeypatch.setattr(evaluation, "solve", solve)
    monkeypatch.setattr(evaluation, "generation_speed", lambda *args, **kwargs: (1.0, 1.0))
    summary = evaluation.benchmark(model, test, 2, [1, 2, 3, 4], 0.01, select)[1]
    assert (summary["ood_steps"], summary["ood_acc"], summary["ood_steps_chosen_on"]) == (2, 0.0, "select")
    summary = evaluation.benchmark(model, test, 2, [1, 2, 3, 4], 0.01)[1]  # without a selection set: the old way
    assert (summary["ood_steps"], summary["ood_acc"], summary["ood_steps_chosen_on"]) == (3, 1.0, "test")
