"""
Problems with a difficulty dial, for the DRE's reasoning benchmark (python bench.py --reasoning). Offline and seeded.

    python data/reasoning/prepare.py                      # pointer chasing, train depth 1-4, test depth 1-8
    python data/reasoning/prepare.py --task=addition      # a+b, train up to 8 digits, test up to 16
    python data/reasoning/prepare.py --train_max=3 --test_max=6 --out_dir=data/reasoning3

pointer: a variable chain in shuffled order among distractor chains; the answer is the query's digit, and the
difficulty is the number of assignments to follow. Every problem has --statements assignments, so its length does
not depend on its difficulty: the only thing out of distribution in the test set is the depth.

    s=d;k=s;t=4;d=8;x=t;k?8        (depth 3: k=s, s=d, d=8; the chain x=t, t=4 is a distractor)

addition: a+b= and the sum's digits least significant first (as it is computed, carry by carry); difficulty is the
number of digits of the larger operand.

    407+95=205                     (407 + 95 = 502, written backwards; difficulty 3)

Writes, next to this file or to --out_dir: train.bin / val.bin (one problem a line, characters as tokens, difficulties
1..train_max), the same problems as train.jsonl / val.jsonl for train.py's mode='sft' (chat.py's template, the loss
on the answers only: what config/reasoning_*.py train with), meta.json, and test.jsonl: {"prompt", "answer",
"difficulty"} lines, --test_per at each difficulty 1..test_max. A model is right when greedy decoding after the prompt
(in the template, for an sft run) gives the answer and then a newline.
"""

import argparse
import json
import os
import random

here = os.path.dirname(os.path.abspath(__file__))
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# the vocabulary of both tasks and of chat.py's template ("Human: ...\n\nAssistant: ...\nEND"), fixed
CHARS = "\n +:;=?" + "0123456789" + "ADEHN" + LETTERS


def pointer_problem(rng, depth, statements, distractor_max, avoid=""):
    """(prompt, answer, letters used): a chain of `depth` assignments ending in a digit, queried from its far end,
    shuffled among distractor chains of 1..distractor_max assignments; `statements` assignments in all. Letters in
    `avoid` (the previous problem's) are not used, so the most recent definition of a letter is always this one's."""
    if not 1 <= depth <= statements:
        raise ValueError(f"depth {depth} needs 1 <= depth <= statements={statements}")
    names = rng.sample([c for c in LETTERS if c not in avoid], statements)  # each assigned exactly once
    chains, sizes, left = [], [depth], statements - depth
    while left:
        sizes.append(rng.randint(1, min(left, distractor_max)))
        left -= sizes[-1]
    for size in sizes:
        chain, names = names[:size], names[size:]  # chain[0] = digit, chain[i] = chain[i - 1]
        value = rng.choice("0123456789")
        chains.append([f"{chain[0]}={value}"] + [f"{b}={a}" for a, b in zip(chain, chain[1:])])
        if len(chains) == 1:
            query, answer = chain[-1], value
    lines = [s for chain in chains for s in chain]
    rng.shuffle(lines)
    return ";".join(lines) + f";{query}?", answer, "".join(s[0] for s in lines)


def addition_problem(rng, digits):
    """(prompt, answer): two numbers, the larger with exactly `digits` digits, and their sum reversed."""
    a = rng.randrange(10 ** (digits - 1), 10 ** digits)
    b = rng.randrange(0, 10 ** rng.randint(1, digits))
    if rng.random() < 0.5:
        a, b = b, a
    return f"{a}+{b}=", str(a + b)[::-1]


def make_problems(task, rng, difficulties, n, statements=10, distractor_max=4):
    """n (prompt, answer, difficulty) triples, difficulties drawn uniformly from the list."""
    out, avoid = [], ""
    for _ in range(n):
        d = rng.choice(difficulties)
        if task == "pointer":
            prompt, answer, avoid = pointer_problem(rng, d, statements, distractor_max, avoid)
        else:
            prompt, answer = addition_problem(rng, d)
        out.append((prompt, answer, d))
    return out


def write_jsonl(path, problems):  # for train.py's mode='sft', whose loss is on the answers only
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": p, "response": a}) + "\n" for p, a, _ in problems)


def write_tokens(path, problems):
    import numpy as np
    stoi = {c: i for i, c in enumerate(CHARS)}
    text = "".join(p + a + "\n" for p, a, _ in problems)
    np.array([stoi[c] for c in text], dtype=np.uint16).tofile(path)
    return len(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="pointer", choices=("pointer", "addition"))
    parser.add_argument("--train_max", type=int, default=None, help="hardest training problem (pointer 4, addition 8)")
    parser.add_argument("--test_max", type=int, default=None, help="hardest test problem (default 2 x train_max)")
    parser.add_argument("--statements", type=int, default=10, help="pointer: assignments per problem")
    parser.add_argument("--train_problems", type=int, default=100_000)
    parser.add_argument("--val_problems", type=int, default=5_000)
    parser.add_argument("--test_per", type=int, default=200, help="test problems per difficulty")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out_dir", default=here)
    args = parser.parse_args()
    train_max = args.train_max or (4 if args.task == "pointer" else 8)
    test_max = args.test_max or 2 * train_max
    if not 1 <= train_max <= test_max:
        raise SystemExit(f"error: need 1 <= train_max ({train_max}) <= test_max ({test_max})")
    if args.task == "pointer" and not test_max <= args.statements <= 13:
        raise SystemExit(f"error: --statements={args.statements} must be from test_max={test_max} to 13 (two "
                         f"problems in a row use distinct letters of the 26)")
    if min(args.train_problems, args.val_problems, args.test_per) < 1:
        raise SystemExit("error: --train_problems, --val_problems and --test_per must be at least 1")
    os.makedirs(args.out_dir, exist_ok=True)
    # one generator per split, so that each is reproducible on its own
    rngs = {split: random.Random(f"{args.seed}-{args.task}-{split}") for split in ("train", "val", "test")}
    make = lambda split, ds, n: make_problems(args.task, rngs[split], ds, n, args.statements)  # noqa: E731
    train = make("train", list(range(1, train_max + 1)), args.train_problems)
    val = make("val", list(range(1, train_max + 1)), args.val_problems)
    sizes = {split: write_tokens(os.path.join(args.out_dir, f"{split}.bin"), problems)
             for split, problems in (("train", train), ("val", val))}
    write_jsonl(os.path.join(args.out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out_dir, "val.jsonl"), val)
    seen = {p for p, _, _ in train}
    with open(os.path.join(args.out_dir, "test.jsonl"), "w") as f:
        for d in range(1, test_max + 1):
            for prompt, answer, _ in make("test", [d], args.test_per):
                f.write(json.dumps({"prompt": prompt, "answer": answer, "difficulty": d}) + "\n")
    with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
        json.dump({"vocab_size": len(CHARS), "dtype": "uint16", "tokenizer": "char", "chars": CHARS, "eot_id": None,
                   "task": args.task, "train_max": train_max, "test_max": test_max}, f)
    print(f"{args.task}: train {len(train):,} problems ({sizes['train']:,} tokens, difficulty 1-{train_max}, "
          f"{len(seen):,} distinct), val {args.val_problems:,} ({sizes['val']:,} tokens), test {args.test_per} per "
          f"difficulty 1-{test_max} -> {args.out_dir}")


if __name__ == "__main__":
    main()
