"""The data preparation scripts, run as users run them (subprocesses into temporary folders), and train.py's
errors on missing or bad data."""

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
import torch

import data
from conftest import ROOT, SHAKESPEARE


@pytest.fixture(scope="module")
def enc():
    return tiktoken.get_encoding("gpt2")


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=120)


def prepare_copy(tmp_path, name):
    """Runs data/<name>/prepare.py from a copy of both Shakespeare scripts (the BPE one runs the character one),
    since they write next to themselves; returns the copy's folder."""
    for copy in ("shakespeare", "shakespeare_char"):
        (tmp_path / "data" / copy).mkdir(parents=True)
        shutil.copy(os.path.join(ROOT, "data", copy, "prepare.py"), tmp_path / "data" / copy)
    folder = tmp_path / "data" / name
    r = run(folder / "prepare.py", "--input", SHAKESPEARE)
    assert r.returncode == 0, r.stderr
    return folder


def load(folder):
    with open(folder / "meta.json") as f:
        meta = json.load(f)
    train, val = (np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"]) for split in ("train", "val"))
    return meta, train, val


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_char_prepare_decodes_back_to_the_text(char_data):  # conftest's fixture runs data/shakespeare_char/prepare.py
    meta, train, val = load(char_data / "data" / "shakespeare_char")
    text = read_text(SHAKESPEARE)
    assert meta["vocab_size"] == len(meta["chars"]) == len(set(text))
    assert len(train) == int(0.9 * len(text))
    assert "".join(meta["chars"][i] for i in np.concatenate([train, val])) == text


def test_bpe_prepare_decodes_back_to_the_text(tmp_path, enc):
    meta, train, val = load(prepare_copy(tmp_path, "shakespeare"))
    assert meta == {"vocab_size": 50257, "dtype": "uint16", "tokenizer": "gpt2", "eot_id": 50256}
    text = read_text(SHAKESPEARE)
    assert enc.decode(np.concatenate([train, val]).tolist()) == text
    assert 0.88 < len(train) / (len(train) + len(val)) < 0.92


def prepare_text(*args):
    return run(os.path.join(ROOT, "data", "text", "prepare.py"), *args)


def documents(tokens, eot):
    """The token stream cut at each end-of-text token: one list per document."""
    docs = [[]]
    for t in tokens.tolist():
        if t == eot:
            docs.append([])
        else:
            docs[-1].append(t)
    return docs


def test_text_prepare_reads_folders_and_jsonl_one_separator_per_document(tmp_path, enc):
    corpus = tmp_path / "corpus"
    (corpus / "b" / "deeper").mkdir(parents=True)
    (corpus / ".hidden").mkdir()
    files = {"a.txt": "First file.\nTwo lines.\n", "b/deeper/c.md": "# Heading\n\nmarkdown *text*",
             "b/z.txt": "naïve café 日本語 🙂", "empty.txt": "", "skipped.py": "print('not text')",
             ".hidden/x.txt": "hidden"}
    for name, text in files.items():
        (corpus / name).write_text(text, encoding="utf-8")
    jsonl_docs = ["doc one", "a literal <|endoftext|> is just text", "", "last\ndocument"]
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i, text in enumerate(jsonl_docs):
            f.write(json.dumps({"text": text, "id": i}) + "\n" + ("\n" if i == 1 else ""))  # plus a blank line
    out = tmp_path / "out"
    r = prepare_text(corpus, tmp_path / "docs.jsonl", "--out_dir", out)
    assert r.returncode == 0, r.stderr
    meta, train, val = load(out)
    assert meta == {"vocab_size": 50257, "dtype": "uint16", "tokenizer": "gpt2", "eot_id": 50256}
    assert train.dtype == np.uint16 and len(train) > 0 and len(val) > 0
    # folder files in sorted path order, then the JSONL lines; empty documents, hidden and non-.txt/.md files left out
    want = [files["a.txt"], files["b/deeper/c.md"], files["b/z.txt"], "doc one", jsonl_docs[1], jsonl_docs[3]]
    docs = documents(np.concatenate([train, val]), meta["eot_id"])
    assert [enc.decode(d) for d in docs] == want  # exactly one end-of-text between documents, none at the ends
    assert docs[4] == enc.encode_ordinary(jsonl_docs[1])


def test_text_prepare_splits_at_a_document_boundary(tmp_path, enc):
    words = ["alpha", "beta", "gamma", "delta"]
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(100):
            f.write(json.dumps({"text": f"document {i}: " + " ".join(words[(i + j) % 4] for j in range(20))}) + "\n")
    r = prepare_text(tmp_path / "docs.jsonl", "--out_dir", tmp_path, "--val_fraction", "0.1")
    assert r.returncode == 0, r.stderr
    meta, train, val = load(tmp_path)
    assert train[-1] == meta["eot_id"]  # val starts with a whole document
    assert [enc.decode(d) for d in documents(val, meta["eot_id"])][0].startswith("document 90:")


def test_text_prepare_single_document_splits_by_tokens(tmp_path, enc):
    text = " ".join(f"word{i}" for i in range(2000))
    (tmp_path / "one.txt").write_text(text)
    r = prepare_text(tmp_path / "one.txt", "--out_dir", tmp_path, "--val_fraction", "0.1")
    assert r.returncode == 0, r.stderr
    meta, train, val = load(tmp_path)
    total = len(enc.encode_ordinary(text))
    assert len(val) == round(0.1 * total) and len(train) + len(val) == total
    assert enc.decode(np.concatenate([train, val]).tolist()) == text


def test_text_prepare_large_file_gives_the_tokens_of_the_whole(tmp_path, enc):
    # prepare.py reads text files 2^20 characters at a time and cuts each piece at a safe line break. Around that
    # mark is a stretch with only unsafe ones: cutting after its "\n\n" would give 628 ("\n\n") where the whole
    # text has 198 198. Before it, random text with all sorts of line breaks.
    rng = random.Random(0)
    words = ["the", "King", "'s", "don't", "42", "3.14", "naïve", "日本語", "🙂", "--", "...", "/x"]
    seps = [" ", "  ", "\n", "\n\n", " \n", "\n ", "\t\n", ".\n", ":\n"]
    head = "".join(rng.choice(words) + rng.choice(seps) for _ in range(250_000))[:2 ** 20 - 5003]
    text = head + "the King\n\n" * 1000 + "".join(rng.choice(words) + rng.choice(seps) for _ in range(5000))
    naive = text.rfind("\n", 0, 2 ** 20 - 1) + 1  # a cut at the last line break would change the tokens:
    assert enc.encode_ordinary(text[:naive]) + enc.encode_ordinary(text[naive:]) != enc.encode_ordinary(text)
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    r = prepare_text(tmp_path / "big.txt", "--out_dir", tmp_path)
    assert r.returncode == 0, r.stderr
    _, train, val = load(tmp_path)
    assert np.concatenate([train, val]).tolist() == enc.encode_ordinary(text)


@pytest.mark.parametrize("case", ["bad_json", "no_text_field", "missing_path", "no_text"])
def test_text_prepare_bad_input_is_one_clear_error(tmp_path, case):
    good = json.dumps({"text": "fine"})
    lines = {"bad_json": [good, good, '{"text": "unterminated'], "no_text_field": [good, good, '{"txt": "x"}']}
    out = tmp_path / "out"
    if case in lines:
        path = tmp_path / "docs.jsonl"
        path.write_text("\n".join(lines[case]) + "\n")
        expected = [str(path), "line 3"]
    elif case == "missing_path":
        path = tmp_path / "no_such_file.txt"
        expected = [str(path), "does not exist"]
    else:
        path = tmp_path / "empty_folder"
        path.mkdir()
        expected = ["no text", str(path)]
    r = prepare_text(path, "--out_dir", out)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    for s in expected:
        assert s in r.stderr
    assert not out.exists() or os.listdir(out) == []  # nothing half-written left behind


def test_text_prepare_says_how_to_read_unnamed_and_non_utf8_files_and_prints_its_summary_once(tmp_path):
    """N5, N6: a folder of files without .txt/.md is answered with how to read them (name them: FOLDER/*), which
    works; a non-UTF-8 file with how to convert it; a run logged to a file says its summary once, on stdout."""
    texts = tmp_path / "my_texts"
    texts.mkdir()
    (texts / "notes").write_text("Some words of a first note.\n" * 40)
    r = prepare_text(texts, "--tokenizer=char", "--out_dir", tmp_path / "a")
    assert r.returncode != 0 and f"{os.path.join(texts, '*')}" in r.stderr and "FOLDER/*" in r.stderr, r.stderr
    r = prepare_text(texts / "notes", "--tokenizer=char", "--out_dir", tmp_path / "a")
    assert r.returncode == 0 and r.stderr == "" and len(r.stdout.strip().splitlines()) == 1, (r.stdout, r.stderr)
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 40)
    r = prepare_text(tmp_path / "latin.txt", "--out_dir", tmp_path / "b")
    assert r.returncode != 0 and "not UTF-8" in r.stderr and "iconv" in r.stderr, r.stderr


# -----------------------------------------------------------------------------
# train.py on missing or bad data and bad settings: a clear message, not a traceback from deep inside.
# The runs start together (each pays for importing torch) and the tests read their results.

SMALL = ["--device=cpu", "--max_iters=1", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8",
         "--batch_size=2", "--eval_iters=1"]


def write_dataset(folder, tokens, vocab_size):
    folder.mkdir(parents=True)
    for split in ("train", "val"):
        np.array(tokens, dtype=np.uint16).tofile(folder / f"{split}.bin")
    with open(folder / "meta.json", "w") as f:
        json.dump({"vocab_size": vocab_size, "dtype": "uint16", "tokenizer": "test", "eot_id": None}, f)


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    write_dataset(tmp / "data" / "good", [i % 10 for i in range(64)], vocab_size=10)
    # every fourth token is past the vocabulary, so that every sampled window holds one
    write_dataset(tmp / "data" / "bad_ids", [4321 if i % 4 == 0 else i % 10 for i in range(64)], vocab_size=10)
    script = os.path.join(ROOT, "train.py")
    cases = {  # name: (extra arguments, working directory)
        "missing_dataset": (["--dataset=no_such_dataset"], ROOT),
        "bad_ids": (["--dataset=bad_ids"], tmp),
        "bad_dtype": (["--dataset=good", "--dtype=float8"], tmp),
        "misspelt_key": (["--dataset=good", "--learnin_rate=1"], tmp),  # test_configurator.py tries --no_such_key
    }
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen([sys.executable, script, *args, *SMALL, f"--out_dir={tmp / 'out' / name}"],
                                    cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, (args, cwd) in cases.items()}
    try:
        outputs = {name: p.communicate(timeout=120)[0] for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return {name: (p.returncode, outputs[name]) for name, p in procs.items()}


def test_train_without_token_files_names_the_prepare_script(train_runs):
    code, output = train_runs["missing_dataset"]
    assert code != 0 and "prepare.py" in output and "no_such_dataset" in output
    assert "Traceback" not in output


def test_train_refuses_token_ids_outside_the_vocabulary(train_runs):
    code, output = train_runs["bad_ids"]
    assert code != 0 and "out of range" in output and "4321" in output
    assert "Traceback" not in output


def test_train_refuses_an_unknown_dtype(train_runs):
    code, output = train_runs["bad_dtype"]
    assert code != 0 and "dtype" in output and "float8" in output
    assert "Traceback" not in output


def test_train_names_the_closest_key_to_a_misspelt_one(train_runs):
    code, output = train_runs["misspelt_key"]
    assert code != 0 and "learnin_rate" in output and "did you mean 'learning_rate'" in output
    assert "Traceback" not in output


def test_pretrain_batch_targets_are_the_next_tokens_and_ranks_share_out_the_global_batch(tmp_path):
    tokens = np.random.default_rng(0).permutation(300).astype(np.uint16)  # distinct: a window is found by its start
    tokens.tofile(tmp_path / "train.bin")
    starts = {t: i for i, t in enumerate(tokens.tolist())}
    x, y = data.pretrain_batch(str(tmp_path / "train.bin"), np.uint16, 6, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (6, 16)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        i = starts[row_x[0]]
        assert row_x == tokens[i:i + 16].tolist() and row_y == tokens[i + 1:i + 17].tolist()
    # two data-parallel ranks draw the same 6 windows and keep 3 each, in order: together the one-process batch
    parts = [data.pretrain_batch(str(tmp_path / "train.bin"), np.uint16, 3, 16, torch.Generator().manual_seed(0),
                                 rank, 2) for rank in (0, 1)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
