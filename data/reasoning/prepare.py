"""
Problems with a difficulty dial, for the DRE's reasoning benchmark (python bench.py reasoning). Offline and seeded.

    python data/reasoning/prepare.py                      # pointer chasing, train depth 1-4, test depth 1-8
    python data/reasoning/prepare.py --task=addition      # a+b, train up to 8 digits, test up to 16
    python data/reasoning/prepare.py --train_max=3 --test_max=6 --out_dir=data/reasoning3
    python data/reasoning/prepare.py --train_weights=8,4,2,1   # depth 1 asked 8 times as often as depth 4
    python data/reasoning/prepare.py --distractor_max=6 --out_dir=data/reasoning_long   # longer prompts, same depths

pointer: variable chains in shuffled order; the answer is a chain head's digit, and the difficulty is the number of
assignments to follow. Every problem has --chains chains ending in distinct digits, the asked one and distractors of
1..4 (at most train_max; in training up to --distractor_max) assignments, so that picking one of the digits it holds
is right 1/chains of the time at every depth (with a fixed number of assignments, deep problems would hold fewer
digits, and guessing would look like reasoning).

    s=d;k=s;t=4;d=8;x=t;|k8        (depth 3: k=s, s=d, d=8; the chain x=t, t=4 is a distractor; two chains)

A training line asks for every chain's head after the '|' (s=d;k=s;t=4;d=8;x=t;|x4k8): several answers per line, each
right after its question. A test prompt asks for its own chain's head only (...;|k, answer 8).

addition: a+b= and the sum's digits least significant first (as it is computed, carry by carry); difficulty is the
number of digits of the larger operand.

    407+95=205                     (407 + 95 = 502, written backwards; difficulty 3)

Writes, next to this file or to --out_dir: train.bin / val.bin (one problem a line, characters as tokens, difficulties
1..train_max), train_mask.bin / val_mask.bin (the loss falls on the answers only; --loss=all: on every token),
meta.json, and test.jsonl: {"prompt", "answer", "difficulty"} lines, --test_per at each difficulty
1..test_max; select.jsonl, more of the same kinds and none of the test's, on which bench.py chooses a step count.
A model is right when greedy decoding after the prompt gives the answer followed by meta.json's answer_end
(addition: a newline; pointer: nothing, the next question's letter is not asked for).
"""

import argparse
import json
import os
import random

here = os.path.dirname(os.path.abspath(__file__))
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHARS = "\n+;=?|" + "0123456789" + LETTERS  # the vocabulary of both tasks, fixed so that one meta.json serves both


def pointer_problem(rng, depth, chains, distractor_max, avoid="", weights=None):
    """A chain of `depth` assignments ending in a digit, shuffled among chains - 1 distractor chains of
    1..distractor_max assignments (drawn with `weights` when given), each chain ending in its own digit. Returns
    (the assignments and '|', [(head, digit, depth)] of each chain, the problem's chain first, letters used). Letters
    in `avoid` (the previous problem's) are not used, so the most recent definition of a letter is always this
    problem's."""
    if depth < 1 or not 1 <= chains <= 10:
        raise ValueError(f"need depth >= 1 (got {depth}) and 1 <= chains <= 10 (got {chains}): one digit per chain")
    sizes = [depth] + ([rng.randint(1, distractor_max) for _ in range(chains - 1)] if weights is None else
                       rng.choices(range(1, distractor_max + 1), weights[:distractor_max], k=chains - 1))
    free = [c for c in LETTERS if c not in avoid]
    if sum(sizes) > len(free):
        raise ValueError(f"depth {depth} with {chains} chains needs {sum(sizes)} letters, {len(free)} are free")
    names, lines, heads = rng.sample(free, sum(sizes)), [], []  # each assigned exactly once
    for size, value in zip(sizes, rng.sample("0123456789", chains)):
        chain, names = names[:size], names[size:]  # chain[0] = digit, chain[i] = chain[i - 1]
        lines += [f"{chain[0]}={value}"] + [f"{b}={a}" for a, b in zip(chain, chain[1:])]
        heads.append((chain[-1], value, size))
    rng.shuffle(lines)
    return ";".join(lines) + ";|", heads, "".join(s[0] for s in lines)


def pointer_line(rng, text, heads, asked_max):
    """A training line: the assignments, then every chain's head of at most asked_max assignments, in random order,
    with its digit. Only heads are asked: a variable further down a chain has its head's digit, which would be a
    one-step shortcut. Longer chains (--distractor_max) only lengthen the prompt."""
    asked = [(h, v) for h, v, size in heads if size <= asked_max]
    return text + "".join(h + v for h, v in rng.sample(asked, len(asked)))


def addition_problem(rng, digits):
    """(prompt, answer): two numbers, the larger with exactly `digits` digits, and their sum reversed."""
    a = rng.randrange(10 ** (digits - 1), 10 ** digits)
    b = rng.randrange(0, 10 ** rng.randint(1, digits))
    if rng.random() < 0.5:
        a, b = b, a
    return f"{a}+{b}=", str(a + b)[::-1]


def make_lines(task, rng, difficulties, n, chains, distractor_max, weights=None):
    """n training lines, each problem's difficulty drawn from the list, uniformly or with `weights` (pointer: the
    distractor chains' sizes 1..distractor_max too)."""
    lines, avoid = [], ""
    for _ in range(n):
        d = rng.choice(difficulties) if weights is None else rng.choices(difficulties, weights)[0]
        if task == "pointer":
            text, heads, avoid = pointer_problem(rng, d, chains, distractor_max, avoid, weights)
            lines.append(pointer_line(rng, text, heads, max(difficulties)) + "\n")
        else:
            lines.append("".join(addition_problem(rng, d)) + "\n")
    return lines


def make_tests(task, rng, difficulty, n, chains=4, distractor_max=4):
    """n test problems {"prompt", "answer", "difficulty"}."""
    tests, avoid = [], ""
    for _ in range(n):
        if task == "pointer":
            text, heads, avoid = pointer_problem(rng, difficulty, chains, distractor_max, avoid)
            prompt, answer = text + heads[0][0], heads[0][1]
        else:
            prompt, answer = addition_problem(rng, difficulty)
        tests.append({"prompt": prompt, "answer": answer, "difficulty": difficulty})
    return tests


def answer_mask(task, line):
    """1 at the characters of a training line that are answers (pointer: the digits after '|'; addition: the sum and
    its newline), 0 elsewhere: the assignments' letters are random, and learning them only adds noise to the loss."""
    q = line.index("|" if task == "pointer" else "=") + 1
    return [0] * q + [int(c.isdigit() or task == "addition") for c in line[q:]]


def write_tokens(path, lines, task, answers_only):
    """The token file and, with answers_only, the mask file beside it (train_mask.bin: uint8, one byte a token)."""
    import numpy as np
    stoi = {c: i for i, c in enumerate(CHARS)}
    text = "".join(lines)
    np.array([stoi[c] for c in text], dtype=np.uint16).tofile(path)
    mask_path = path[:-len(".bin")] + "_mask.bin"
    if answers_only:
        np.array([m for line in lines for m in answer_mask(task, line)], dtype=np.uint8).tofile(mask_path)
    elif os.path.exists(mask_path):
        os.remove(mask_path)  # a stale mask would apply to the new tokens
    return len(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="pointer", choices=("pointer", "addition"))
    parser.add_argument("--train_max", type=int, default=None, help="hardest training problem (pointer 4, addition 8)")
    parser.add_argument("--test_max", type=int, default=None, help="hardest test problem (default 2 x train_max)")
    parser.add_argument("--chains", type=int, default=4, help="pointer: chains per problem, the asked one included")
    parser.add_argument("--train_weights", default=None,
                        help="how often each training difficulty 1..train_max comes, e.g. 8,4,2,1 (default: evenly)")
    parser.add_argument("--distractor_max", type=int, default=None,
                        help="pointer: the longest distractor chain in training (default min(4, train_max)); those "
                             "longer than train_max lengthen the prompt and are not asked")
    parser.add_argument("--train_problems", type=int, default=200_000)
    parser.add_argument("--val_problems", type=int, default=5_000)
    parser.add_argument("--test_per", type=int, default=200, help="test problems per difficulty")
    parser.add_argument("--loss", default="answers", choices=("answers", "all"),
                        help="train on the answers only (writes train_mask.bin, val_mask.bin) or on every token")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out_dir", default=here)
    args = parser.parse_args()
    train_max = args.train_max or (4 if args.task == "pointer" else 8)
    test_max = args.test_max or 2 * train_max
    if not 1 <= train_max <= test_max:
        raise SystemExit(f"error: need 1 <= train_max ({train_max}) <= test_max ({test_max})")
    if args.task == "pointer" and not (2 <= args.chains <= 10 and test_max + 4 * (args.chains - 1) <= 26):
        raise SystemExit(f"error: --chains={args.chains} must be 2-10 with test_max + 4 x (chains - 1) <= 26, the "
                         f"letters a problem may use (two problems in a row use distinct ones of the 52)")
    try:
        weights = None if args.train_weights is None else [float(w) for w in args.train_weights.split(",")]
    except ValueError:
        weights = []
    if weights is not None and (len(weights) != train_max or min(weights) < 0 or sum(weights) <= 0):
        raise SystemExit(f"error: --train_weights={args.train_weights} needs {train_max} numbers (one per training "
                         f"difficulty 1..{train_max}, comma-separated, not negative, not all 0), e.g. 8,4,2,1")
    longest = min(4, train_max) if args.distractor_max is None else args.distractor_max
    if args.task == "pointer" and not (1 <= longest and train_max + longest * (args.chains - 1) <= 26):
        raise SystemExit(f"error: --distractor_max={longest} must be at least 1 with train_max + distractor_max x "
                         f"(chains - 1) <= 26, the letters a problem may use")
    if weights is not None and longest > train_max:
        raise SystemExit(f"error: --train_weights weigh distractor sizes 1..train_max too; they cannot go with "
                         f"--distractor_max={longest} > train_max ({train_max})")
    if min(args.train_problems, args.val_problems, args.test_per) < 1:
        raise SystemExit("error: --train_problems, --val_problems and --test_per must be at least 1")
    os.makedirs(args.out_dir, exist_ok=True)
    # one generator per split, so that each is reproducible on its own
    rngs = {split: random.Random(f"{args.seed}-{args.task}-{split}") for split in ("train", "val", "test", "select")}
    trained = list(range(1, train_max + 1))
    # the weights shape what training sees; val stays even, so that its loss compares across runs
    sizes = {split: write_tokens(os.path.join(args.out_dir, f"{split}.bin"),
                                 make_lines(args.task, rngs[split], trained, n, args.chains, longest,
                                            weights=weights if split == "train" else None), args.task,
                                 args.loss == "answers")
             for split, n in (("train", args.train_problems), ("val", args.val_problems))}
    # test.jsonl, and select.jsonl: problems of the same kinds, none of the test's, on which bench.py chooses the
    # step count it reports test accuracy at (a choice made on the test problems would flatter that accuracy)
    tests = {}
    for split in ("test", "select"):
        with open(os.path.join(args.out_dir, f"{split}.jsonl"), "w") as f:
            for d in range(1, test_max + 1):
                made = make_tests(args.task, rngs[split], d, args.test_per, args.chains,
                                  distractor_max=min(4, train_max))
                tests.setdefault(split, set()).update(t["prompt"] for t in made)
                for t in made:
                    if split == "test" or t["prompt"] not in tests["test"]:
                        f.write(json.dumps(t) + "\n")
    with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
        json.dump({"vocab_size": len(CHARS), "dtype": "uint16", "tokenizer": "char", "chars": CHARS, "eot_id": None,
                   "task": args.task, "train_max": train_max, "test_max": test_max, "chains": args.chains,
                   "answer_end": "" if args.task == "pointer" else "\n"}, f)
    print(f"{args.task}: train {args.train_problems:,} problems ({sizes['train']:,} tokens, difficulty "
          f"1-{train_max}), val {args.val_problems:,} ({sizes['val']:,} tokens), test {args.test_per} per difficulty "
          f"1-{test_max} -> {args.out_dir}")


if __name__ == "__main__":
    main()
