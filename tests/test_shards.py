"""Pretraining corpora as token shards (data/fineweb/prepare.py, data.token_files / pretrain_batch) and a BPE
tokenizer trained on the data (data.train_bpe): checked against plain tiktoken, a naive BPE loop and hand-made
shards; train.py trains and resumes on shards made from Parquet files, and its checkpoint carries the tokenizer."""

import importlib.util
import json
import os
import random
import runpy
import shutil
import sys

import numpy as np
import pytest
import regex
import tiktoken
import torch

import data
from conftest import ROOT, SHAKESPEARE, run_train

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
spec = importlib.util.spec_from_file_location("fineweb_prepare", os.path.join(ROOT, "data", "fineweb", "prepare.py"))
prepare = sys.modules["fineweb_prepare"] = importlib.util.module_from_spec(spec)  # by name: its processes unpickle
spec.loader.exec_module(prepare)


def shakespeare_docs(n_chars=None):
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()[:n_chars].split("\n\n")


def write_corpus(folder, docs):
    """Two Parquet files (small row groups, a null and an empty text among them) and a JSONL file."""
    folder.mkdir(parents=True, exist_ok=True)
    a, b, c = len(docs) // 3, 2 * len(docs) // 3, len(docs)
    docs = list(docs)
    docs[a + 3], docs[a + 4] = None, ""
    for name, part in (("a.parquet", docs[:a]), ("b.parquet", docs[a:b])):
        pq.write_table(pa.table({"id": list(range(len(part))), "text": part}), folder / name, row_group_size=50)
    (folder / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[b:c]))
    return [d for d in docs if d]  # the documents, in the order the prepare reads them


def shards(folder):
    meta = json.loads((folder / "meta.json").read_text())
    names = ["val_000000.bin"] + sorted(n for n in meta["shards"] if n.startswith("train_"))
    return meta, {n: (folder / n).read_bytes() for n in names}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_corpus(folder, shakespeare_docs(150_000))


ARGS = ["--shard_tokens=3000", "--val_tokens=2000", "--procs=1"]


def test_prepare_writes_each_document_after_an_end_of_text_in_fixed_shards(corpus, tmp_path):
    folder, docs = corpus
    prepare.main([str(folder), f"--out_dir={tmp_path}", *ARGS])
    meta, files = shards(tmp_path)
    enc = tiktoken.get_encoding("gpt2")
    expected = [t for d in docs for t in [enc.eot_token] + enc.encode_ordinary(d)]  # llm.c's FineWeb layout
    stream = np.concatenate([np.frombuffer(b, dtype=np.uint16) for b in files.values()])
    assert stream.tolist() == expected
    sizes = [len(b) // 2 for b in files.values()]
    assert sizes[0] == 2000 and set(sizes[1:-1]) == {3000} and 0 < sizes[-1] <= 3000
    assert meta["shards"] == dict(zip(files, sizes)) and meta["dtype"] == "uint16" and meta["eot_id"] == 50256


def test_interrupted_prepare_continues_to_identical_shards(corpus, tmp_path, monkeypatch):
    folder, _ = corpus
    prepare.main([str(folder), f"--out_dir={tmp_path / 'whole'}", *ARGS])
    monkeypatch.setattr(prepare, "CHUNK_DOCS", 16)  # chunks that end inside shards, shards inside documents
    real, calls = prepare.encode_chunk, []

    def dies(task):  # Ctrl-C in the middle of the second file
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return real(task)
    monkeypatch.setattr(prepare, "encode_chunk", dies)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        prepare.main([str(folder), f"--out_dir={cut}", *ARGS])
    finished = {n: os.stat(cut / n) for n in json.loads((cut / "prepare_state.json").read_text())["shards"]}
    assert len(finished) >= 3 and not (cut / "meta.json").exists()
    monkeypatch.setattr(prepare, "encode_chunk", real)
    prepare.main([str(folder), f"--out_dir={cut}", *ARGS[:-1], "--procs=2"])  # and the process count changes nothing
    assert shards(cut) == shards(tmp_path / "whole")
    for name, st in finished.items():  # a finished shard is never written again
        assert (os.stat(cut / name).st_ino, os.stat(cut / name).st_mtime_ns) == (st.st_ino, st.st_mtime_ns)


def test_max_tokens_takes_a_sample_that_a_longer_run_extends(corpus, tmp_path):
    folder, _ = corpus
    prepare.main([str(folder), f"--out_dir={tmp_path / 'whole'}", *ARGS])
    prepare.main([str(folder), f"--out_dir={tmp_path / 'part'}", *ARGS, "--max_tokens=9500"])
    meta, files = shards(tmp_path / "part")
    assert sum(meta["shards"].values()) == 9500 and list(meta["shards"].values()) == [2000, 3000, 3000, 1500]
    _, whole = shards(tmp_path / "whole")
    assert b"".join(files.values()) == b"".join(whole.values())[:9500 * 2]
    prepare.main([str(folder), f"--out_dir={tmp_path / 'part'}", *ARGS])  # the rest, after the finished shards
    assert shards(tmp_path / "part") == shards(tmp_path / "whole")
    with pytest.raises(SystemExit, match="more than --max_tokens=5,000"):  # a smaller sample: not by deleting shards
        prepare.main([str(folder), f"--out_dir={tmp_path / 'part'}", *ARGS, "--max_tokens=5000"])
    with pytest.raises(SystemExit, match="other settings.*shard_tokens"):
        prepare.main([str(folder), f"--out_dir={tmp_path / 'part'}", "--shard_tokens=5000", "--val_tokens=2000"])


def test_hub_files_download_one_ahead_and_tokenize_as_local_ones(corpus, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")  # the Hub, played by a local folder: this machine has no network
    folder, _ = corpus
    served = {f"sample/10BT/{n}": folder / n for n in ("a.parquet", "b.parquet")}
    fetched = []

    def download(repo, name, repo_type, local_dir):
        assert (repo, repo_type) == ("HuggingFaceFW/fineweb-edu", "dataset")
        fetched.append(name)
        os.makedirs(os.path.dirname(os.path.join(local_dir, name)), exist_ok=True)
        return shutil.copy(served[name], os.path.join(local_dir, name))
    monkeypatch.setattr(hub, "list_repo_files", lambda repo, repo_type: ["README.md", *sorted(served)])
    monkeypatch.setattr(hub, "hf_hub_download", download)
    prepare.main([f"--out_dir={tmp_path / 'hub'}", *ARGS[:-1], "--procs=2"])
    prepare.main([str(folder / "a.parquet"), str(folder / "b.parquet"), f"--out_dir={tmp_path / 'local'}", *ARGS])
    (hub_meta, hub_shards), (local_meta, local_shards) = shards(tmp_path / "hub"), shards(tmp_path / "local")
    assert fetched == sorted(served) and hub_shards == local_shards and hub_meta["shards"] == local_meta["shards"]
    assert hub_meta["source"] == "HuggingFaceFW/fineweb-edu:sample/10BT/*.parquet"


# -----------------------------------------------------------------------------
# train.py's side: windows across shards, checks per shard


def write_shards(folder, sizes, dtype=np.uint16, vocab_size=1000):
    """Shards whose tokens count up through the whole stream (mod vocab_size), and the meta.json listing them."""
    folder.mkdir(parents=True, exist_ok=True)
    start, listed = 0, {}
    for k, n in enumerate(sizes):
        name = "val_000000.bin" if k == 0 else f"train_{k - 1:06d}.bin"
        (np.arange(start, start + n) % vocab_size).astype(dtype).tofile(folder / name)
        start, listed[name] = start + n, n
    (folder / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "dtype": np.dtype(dtype).name,
                                                  "tokenizer": "gpt2", "shards": listed}))
    return data.token_files(str(folder), "train")


def test_windows_are_drawn_uniformly_across_shards_and_split_between_ranks(tmp_path):
    paths = write_shards(tmp_path, [50, 40, 9, 25, 70])  # train shards of 40, 9 (too short: no window), 25, 70
    assert [os.path.basename(p) for p in paths] == [f"train_00000{i}.bin" for i in range(4)]
    block, arrays = 10, [np.fromfile(p, dtype=np.uint16) for p in paths]
    every = [(f, i) for f, a in enumerate(arrays) for i in range(len(a) - block)]  # naive: all windows, listed
    x, y = data.pretrain_batch(paths, np.dtype(np.uint16), 64, block, torch.Generator().manual_seed(3))
    ix = torch.randint(len(every), (64,), generator=torch.Generator().manual_seed(3))
    expected = np.stack([arrays[f][i:i + block + 1] for f, i in (every[j] for j in ix.tolist())])
    assert torch.equal(x, torch.from_numpy(expected[:, :-1].astype(np.int64)))
    assert torch.equal(y, torch.from_numpy(expected[:, 1:].astype(np.int64)))
    mask = np.arange(len(arrays[3])) % 2  # a mask beside one shard: no loss on its even tokens, the rest untouched
    mask.astype(np.uint8).tofile(paths[3][:-4] + "_mask.bin")
    xm, ym = data.pretrain_batch(paths, np.dtype(np.uint16), 64, block, torch.Generator().manual_seed(3))
    in_3 = torch.tensor([every[j][0] == 3 for j in ix.tolist()])
    assert torch.equal(xm, x) and torch.equal(ym[~in_3], y[~in_3]) and in_3.any()
    assert torch.equal(ym[in_3], torch.where(y[in_3] % 2 == 1, y[in_3], -1))  # tokens count up: odd ones are kept
    os.remove(paths[3][:-4] + "_mask.bin")
    halves = [data.pretrain_batch(paths, np.dtype(np.uint16), 32, block, torch.Generator().manual_seed(3), r, 2)
              for r in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), x)  # each rank its slice of the same draw
    one = write_shards(tmp_path / "one", [30, 200])  # a single shard draws exactly as a single train.bin
    shutil.copy(one[0], tmp_path / "one" / "train.bin")
    single = data.token_files(str(tmp_path / "one"), "train")
    assert single == [str(tmp_path / "one" / "train.bin")]
    draws = [data.pretrain_batch(p, np.dtype(np.uint16), 8, block, torch.Generator().manual_seed(1))
             for p in (one, single[0])]
    assert all(torch.equal(a, b) for a, b in zip(*draws))


def test_a_bad_shard_is_named_with_the_fix(tmp_path):
    check = lambda: data.check_token_files(str(tmp_path), ("train", "val"), np.dtype(np.uint16), 8, 1000)  # noqa
    paths = write_shards(tmp_path, [100, 100, 60])
    assert check() == {"train": paths, "val": [str(tmp_path / "val_000000.bin")]}
    with open(paths[1], "r+b") as f:  # an interrupted copy
        f.truncate(50)
    with pytest.raises(ValueError, match="train_000001.bin holds 25.0 uint16 tokens where meta.json lists 60.*trunc"):
        check()
    np.arange(60, dtype=np.uint32).tofile(paths[1])  # another prepare's shard, of uint32 tokens
    with pytest.raises(ValueError, match="train_000001.bin holds 120.0 uint16 tokens where meta.json lists 60"):
        check()
    np.arange(60, dtype=np.uint16).tofile(paths[1])
    np.arange(60, dtype=np.uint16).tofile(tmp_path / "train_000002.bin")
    with pytest.raises(ValueError, match="train_000002.bin is not among meta.json's shards"):
        check()
    os.remove(tmp_path / "train_000002.bin")
    (np.arange(60) + 990).astype(np.uint16).tofile(paths[1])  # ids past the vocabulary
    with pytest.raises(ValueError, match="token id 1049 in train_000001.bin is out of range for vocab_size=1000"):
        check()
    with pytest.raises(ValueError, match="in train_000001.bin is out of range"):  # and batches past the scan
        data.pretrain_batch(paths, np.uint16, 64, 8, torch.Generator().manual_seed(0), vocab_size=1000)
    os.remove(paths[1])
    with pytest.raises(ValueError, match="train_000001.bin is missing"):
        check()
    write_shards(tmp_path, [100, 100, 60])
    os.remove(tmp_path / "meta.json")
    with pytest.raises(ValueError, match="lists none: their prepare has not finished"):
        check()


# -----------------------------------------------------------------------------
# a tokenizer of the data's own


def naive_bpe(spec, text):
    """Byte-pair encoding as its definition reads: split by the pattern, then in each piece merge the adjacent pair
    whose joined bytes rank lowest, until no joined pair is a token."""
    rank = {data.base64.b64decode(t): r for r, t in enumerate(spec["tokens"])}
    ids = []
    for piece in regex.findall(spec["pattern"], text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(rank.get(parts[i] + parts[i + 1], len(rank)), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            if best == len(rank):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [rank[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def bpe():
    return data.train_bpe(shakespeare_docs(300_000), 700)


def test_trained_bpe_round_trips_any_bytes_and_encodes_as_bpe_defines(bpe):
    assert len(bpe["tokens"]) == 699 and len(set(bpe["tokens"])) == 699
    assert [data.base64.b64decode(t) for t in bpe["tokens"][:256]] == [bytes([b]) for b in range(256)]
    tok = data.Tokenizer({"tokenizer": "bpe", "bpe": bpe, "eot_id": 699})
    assert tok.vocab_size == 700 and tok.encode("<|endoftext|>", special=True) == [699]
    rng = random.Random(0)
    texts = [shakespeare_docs()[-40], "  x\r\n\t\u00a0日本語 🙂 e\u0301 12345678 don't DON'T <|endoftext|>",
             bytes(rng.randrange(256) for _ in range(2000)).decode("utf-8", "replace"),
             "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000)])) for _ in range(2000))]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # exactly, bytes and all
        assert ids == naive_bpe(bpe, text)
    held_out = "\n\n".join(shakespeare_docs()[-300:])
    assert len(tok.encode(held_out)) < len(held_out.encode()) / 1.8  # it learned English: 1.8+ bytes a token
    assert data.train_bpe(shakespeare_docs(300_000), 700) == bpe  # deterministic


def test_hf_export_encodes_the_trained_bpe_as_tiktoken_does(bpe):
    pytest.importorskip("tokenizers")
    import convert
    meta = {"tokenizer": "bpe", "bpe": bpe, "eot_id": 699}
    hf, specials = convert.build_tokenizer(meta)
    text = shakespeare_docs()[-300] + " 日本語 🙂 123456<|endoftext|>"
    assert hf.encode(text).ids == data.Tokenizer(meta).encode(text, special=True)
    assert specials["eos_token"] == "<|endoftext|>"


def test_text_prepare_trains_a_bpe_on_the_text_before_val(tmp_path, monkeypatch, capsys):
    text = "".join(shakespeare_docs(60_000))
    (tmp_path / "in.txt").write_text(text)
    monkeypatch.setattr(sys, "argv", ["prepare.py", str(tmp_path / "in.txt"), "--tokenizer=bpe:400",
                                      "--val_fraction=0.1", f"--out_dir={tmp_path}"])
    runpy.run_path(os.path.join(ROOT, "data", "text", "prepare.py"), run_name="__main__")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 400 and meta["eot_id"] == 399
    ids = np.concatenate([np.fromfile(tmp_path / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert data.Tokenizer(meta).decode(ids.tolist()) == text
    assert meta["bpe"] == data.train_bpe([text[:int(0.9 * len(text)) + 1]], 400)  # learnt before the val text


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_train_resumes_bitwise_on_parquet_shards_and_the_checkpoint_carries_the_bpe(tmp_path, monkeypatch, capsys):
    write_corpus(tmp_path / "parquet", shakespeare_docs(200_000))
    prepare.main([str(tmp_path / "parquet"), f"--out_dir={tmp_path / 'data' / 'fw'}", "--tokenizer=bpe:512",
                  "--tokenizer_chars=100000", "--shard_tokens=8000", "--val_tokens=4000", "--procs=1"])
    meta = json.loads((tmp_path / "data" / "fw" / "meta.json").read_text())
    assert len(meta["shards"]) > 4 and meta["tokenizer"] == "bpe"
    tiny = ["--dataset=fw", "--device=cpu", "--dtype=float32", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=32", "--batch_size=8", "--eval_iters=2", "--warmup_iters=2", "--lr_decay_iters=100",
            "--learning_rate=3e-3", "--eval_interval=6", "--dropout=0.1", "--keep_last=2"]
    run_train([*tiny, "--out_dir=whole", "--max_iters=12"], tmp_path)
    (tmp_path / "split").mkdir()
    shutil.copy(tmp_path / "whole" / "ckpt-6.pt", tmp_path / "split" / "ckpt.pt")  # the run as it was at iter 6
    run_train(["--init_from=resume", "--out_dir=split", "--max_iters=12"], tmp_path)
    losses = [{r["iter"]: r["loss"] for r in map(json.loads, open(tmp_path / run / "metrics.jsonl")) if "loss" in r}
              for run in ("whole", "split")]
    assert sorted(losses[1]) == list(range(7, 13))
    assert all(losses[1][i] == losses[0][i] for i in range(7, 13)), losses  # bitwise

    shutil.rmtree(tmp_path / "data")  # the tokenizer now lives in the checkpoint alone
    from convert import load_run
    model, tok, _ = load_run(str(tmp_path / "whole"), "cpu")
    assert tok.spec == data.tokenizer_spec(meta)
    prompt = "ROMEO:\nWhat say'st thou?"
    x = torch.tensor([tok.encode(prompt)])
    expected = data.Tokenizer(meta).decode(model.generate(x, 20, temperature=0)[0].tolist())  # greedy
    monkeypatch.setattr(sys, "argv", ["sample.py", f"--out_dir={tmp_path / 'whole'}", "--device=cpu",
                                      "--num_samples=1", "--max_new_tokens=20", "--temperature=0", f"--start={prompt}",
                                      "--dtype=float32"])
    capsys.readouterr()
    runpy.run_path(os.path.join(ROOT, "sample.py"), run_name="__main__")
    assert capsys.readouterr().out.startswith(expected + "\n")
