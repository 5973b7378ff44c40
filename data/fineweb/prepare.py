"""
A pretraining corpus from the Hugging Face Hub, or from local Parquet / JSONL files, as token shards for train.py.
By default FineWeb-Edu's 10B-token sample (about 28 GB of Parquet), into data/fineweb: train with --dataset=fineweb.

    python data/fineweb/prepare.py                                  # FineWeb-Edu sample-10BT, GPT-2 tokens
    python data/fineweb/prepare.py --max_tokens=1e9                 # its first billion tokens
    python data/fineweb/prepare.py --repo=HuggingFaceFW/fineweb --out_dir=data/fineweb10B  # modded-nanogpt's corpus
    python data/fineweb/prepare.py my_corpus/ extra.jsonl --out_dir=data/mine --tokenizer=bpe:32768

Inputs: the Parquet files of --repo matching --files, downloaded one ahead of the tokenizer into
OUT_DIR/download (huggingface_hub resumes a broken download), or local .parquet / .jsonl files and folders of them,
in sorted order. A document is a row's --text_column (a JSONL line's field of that name); each is preceded by the
end-of-text token, as GPT-2 was trained (and llm.c and modded-nanogpt prepare FineWeb). The first --val_tokens tokens
are val_000000.bin; the rest go to train_000000.bin, train_000001.bin, ... of --shard_tokens each, the last shorter.
meta.json lists every shard's token count. --tokenizer is a tiktoken encoding or bpe:N, a byte-level BPE of N tokens
trained here on --tokenizer_chars characters from past the validation text (its table goes into meta.json).

A finished shard is never written again: run the same command after an interruption and it continues after the last
finished shard, with shards byte for byte those of an uninterrupted run (OUT_DIR/prepare_state.json says where the
next one starts). --procs processes tokenize; the shards do not depend on how many.
"""

import argparse
import fnmatch
import importlib
import json
import os
import sys
import time
from collections import deque
from itertools import chain

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", ".."))  # the repository: data.py
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(here, "..", "tiktoken"))  # GPT-2's BPE files ship with us
import data  # noqa: E402

CHUNK_DOCS = 256  # documents a tokenizing task gets


def need(module, package, why):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"error: {why} needs {package}: pip install {package}") from None


def count(text):
    """An int from '100000000', '1e8' or '100_000_000'."""
    value = float(text.replace("_", ""))
    if value != int(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text}")
    return int(value)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="PATH", help="local .parquet/.jsonl files or folders (default: "
                                                             "download --repo)")
    p.add_argument("--repo", default="HuggingFaceFW/fineweb-edu", help="a Hub dataset (default: %(default)s)")
    p.add_argument("--files", default="sample/10BT/*.parquet", help="which of its files (default: %(default)s)")
    p.add_argument("--text_column", default="text")
    p.add_argument("--out_dir", default=here, help="where the shards go (default: %(default)s)")
    p.add_argument("--tokenizer", default="gpt2", help="a tiktoken encoding, or bpe:N (default: %(default)s)")
    p.add_argument("--tokenizer_chars", type=count, default=10**9, help="characters a bpe:N learns from")
    p.add_argument("--shard_tokens", type=count, default=10**8, help="tokens per train shard (default: 1e8)")
    p.add_argument("--val_tokens", type=count, default=10 * 2**20, help="tokens of val_000000.bin (default: "
                                                                        "%(default)s, modded-nanogpt's)")
    p.add_argument("--max_tokens", type=count, default=0, help="stop after this many tokens (0: the whole corpus)")
    p.add_argument("--procs", type=int, default=os.cpu_count(), help="tokenizing processes (default: all CPUs)")
    args = p.parse_args(argv)
    if args.shard_tokens < 1 or args.val_tokens < 1 or args.procs < 1:
        p.error("--shard_tokens, --val_tokens and --procs must be positive")
    if args.max_tokens and args.max_tokens <= args.val_tokens:
        p.error(f"--max_tokens={args.max_tokens} leaves nothing after --val_tokens={args.val_tokens} for training")
    return args


def input_files(args):
    """[(name, local path or None until downloaded)] in order: the local inputs, or --repo's files."""
    if args.inputs:
        found = []
        for path in args.inputs:
            if not os.path.exists(path):
                raise SystemExit(f"error: {path} does not exist")
            names = [path] if os.path.isfile(path) else sorted(
                os.path.join(root, f) for root, _, files in os.walk(path) for f in files)
            names = [n for n in names if n.endswith((".parquet", ".jsonl"))]
            if not names:
                raise SystemExit(f"error: no .parquet or .jsonl files in {path}")
            found += names
        return [(n, n) for n in found]
    hub = need("huggingface_hub", "huggingface_hub", "downloading from the Hugging Face Hub")
    try:
        names = sorted(fnmatch.filter(hub.list_repo_files(args.repo, repo_type="dataset"), args.files))
    except Exception as e:  # offline, a mistyped repo, a gated one without a token
        raise SystemExit(f"error: could not list --repo={args.repo} on the Hugging Face Hub ({type(e).__name__}: "
                         f"{e}); check the name and your connection, or give local files")
    if not names:
        raise SystemExit(f"error: no files of --repo={args.repo} match --files={args.files}")
    return [(n, None) for n in names]


class Inputs:
    """The input files by index, local or downloaded (one file ahead of the one asked for, in a thread)."""

    def __init__(self, args):
        self.args, self.files, self.pool, self.ahead, self.rows = args, input_files(args), None, {}, {}

    def __len__(self):
        return len(self.files)

    def __call__(self, f):
        if self.files[f][1] is None:
            from concurrent.futures import ThreadPoolExecutor
            from huggingface_hub import hf_hub_download
            self.pool = self.pool or ThreadPoolExecutor(1)
            for g in (f, f + 1):
                if g < len(self.files) and self.files[g][1] is None and g not in self.ahead:
                    self.ahead[g] = self.pool.submit(hf_hub_download, self.args.repo, self.files[g][0],
                                                     repo_type="dataset",
                                                     local_dir=os.path.join(self.args.out_dir, "download"))
            self.take(f)
        return self.files[f][1]

    def take(self, f):
        try:
            self.files[f] = (self.files[f][0], self.ahead.pop(f).result())
        except Exception as e:  # the network, the disk
            raise SystemExit(f"error: downloading {self.files[f][0]} failed ({type(e).__name__}: {e}); run the "
                             f"same command again to resume") from None

    def quiet(self):
        """No download thread left (before forking the tokenizing processes): waits for the one under way."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
            for g in list(self.ahead):
                self.take(g)

    def done(self, f, row):
        """The share of the input before file f's row `row` (a JSONL file counts whole)."""
        if f not in self.rows:
            import pyarrow.parquet as pq
            path = self(f)
            self.rows[f] = pq.ParquetFile(path).metadata.num_rows if path.endswith(".parquet") else 0
        return (f + (min(1, row / self.rows[f]) if self.rows[f] else 0)) / len(self.files)


def texts(path, column, start=0):
    """The documents of a Parquet or JSONL file from row `start` on (a missing or null text is '')."""
    if path.endswith(".parquet"):
        pf = need("pyarrow.parquet", "pyarrow", "reading Parquet").ParquetFile(path)
        if column not in pf.schema_arrow.names:
            raise SystemExit(f"error: {path} has no column {column!r} (it has {', '.join(pf.schema_arrow.names)}); "
                             f"set --text_column")
        first = 0
        for g in range(pf.num_row_groups):  # whole row groups before `start` are skipped unread
            rows = pf.metadata.row_group(g).num_rows
            if first + rows > start:
                for batch in pf.iter_batches(batch_size=1024, row_groups=[g], columns=[column]):
                    for text in batch.column(0).to_pylist()[max(0, start - first):]:
                        yield text or ""
                    first += batch.num_rows
            else:
                first += rows
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if lineno <= start:
                continue
            try:
                text = json.loads(line).get(column, "") if line.strip() else ""
            except (json.JSONDecodeError, AttributeError):
                raise SystemExit(f"error: {path}, line {lineno}: not a JSON object")
            if not isinstance(text, str):
                raise SystemExit(f"error: {path}, line {lineno}: {column!r} must be a string")
            yield text


# each tokenizing process builds the encoding once
_enc = _eot = None


def start_worker(spec):
    global _enc, _eot
    _enc, _eot = data.Tokenizer(spec).backend, spec["eot_id"]


def encode_chunk(task):
    """(file, first row, tokens per document, the tokens): each non-empty document after an end-of-text."""
    f, row, docs = task
    ids = [[_eot] + _enc.encode_ordinary(text) if text else [] for text in docs]
    lengths = np.array([len(d) for d in ids], dtype=np.int64)
    return f, row, lengths, np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))


def chunks(inputs, column, position):
    """(file index, first row, documents) of at most CHUNK_DOCS documents, from `position` on."""
    for f in range(position[0], len(inputs)):
        row, docs = position[1] if f == position[0] else 0, []
        start = row
        for text in texts(inputs(f), column, row):
            docs.append(text)
            if len(docs) == CHUNK_DOCS:
                yield f, start, docs
                start, docs = start + len(docs), []
        if docs:
            yield f, start, docs


def tokenized(tasks, spec, procs):
    """encode_chunk of each task, in order: in this process, or spread over `procs` with a few tasks in flight."""
    if procs == 1:
        start_worker(spec)
        yield from map(encode_chunk, tasks)
        return
    import multiprocessing  # forked on Linux (no download thread runs then: Inputs.quiet), spawned elsewhere
    with multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
            procs, start_worker, (spec,)) as pool:
        pending = deque()
        for task in tasks:
            pending.append(pool.apply_async(encode_chunk, (task,)))
            if len(pending) >= 2 * procs:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def tokenizer_spec(args, inputs):
    """The tokenizer's spec (data.tokenizer_spec): a tiktoken encoding, or a BPE trained on the inputs."""
    if args.tokenizer == "char":
        raise SystemExit("error: --tokenizer=char needs every character of the corpus first; use "
                         "data/text/prepare.py for that, or bpe:N here")
    if not args.tokenizer.startswith("bpe:"):
        import tiktoken
        try:
            enc = tiktoken.get_encoding(args.tokenizer)
        except Exception as e:
            raise SystemExit(f"error: could not load --tokenizer={args.tokenizer} ({type(e).__name__}: {e})")
        return {"tokenizer": args.tokenizer, "eot_id": enc.eot_token}
    try:
        n = int(args.tokenizer[4:])
    except ValueError:
        raise SystemExit(f"error: --tokenizer={args.tokenizer}: write bpe:N with N the vocabulary size, e.g. "
                         f"bpe:32768") from None

    def sample():  # past ~8 characters a validation token (a BPE of this size averages under 5), then
        skip, left = 8 * args.val_tokens, args.tokenizer_chars  # --tokenizer_chars of them
        for f in range(len(inputs)):
            for text in texts(inputs(f), args.text_column):
                if skip > 0:
                    skip -= len(text)
                elif left > 0:
                    left -= len(text)
                    yield text
                else:
                    return

    t0 = time.time()
    try:
        bpe = data.train_bpe(sample(), n)
    except (ImportError, ValueError) as e:
        raise SystemExit(f"error: --tokenizer={args.tokenizer}: {e}")
    print(f"trained a BPE of {len(bpe['tokens']) + 1} tokens in {time.time() - t0:.0f} s")
    return {"tokenizer": "bpe", "eot_id": len(bpe["tokens"]), "bpe": bpe}


def shard_name(k):
    return "val_000000.bin" if k == 0 else f"train_{k - 1:06d}.bin"


def save_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.path.isfile(args.out_dir):
        raise SystemExit(f"error: --out_dir {args.out_dir} is a file; give a folder for the shards")
    os.makedirs(args.out_dir, exist_ok=True)
    inputs = Inputs(args)
    state_path, meta_path = os.path.join(args.out_dir, "prepare_state.json"), os.path.join(args.out_dir, "meta.json")
    settings = {"inputs": [n for n, _ in inputs.files], "text_column": args.text_column, "tokenizer": args.tokenizer,
                "tokenizer_chars": args.tokenizer_chars if args.tokenizer.startswith("bpe:") else None,
                "shard_tokens": args.shard_tokens, "val_tokens": args.val_tokens}
    state = None
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        changed = [k for k in settings if state["settings"].get(k) != settings[k]]
        if changed:
            raise SystemExit(f"error: {args.out_dir} holds shards prepared with other settings ({', '.join(changed)}"
                             f"); give another --out_dir, or delete its shards and {state_path}")
        if state.get("done") == args.max_tokens and os.path.exists(meta_path):
            print(f"{args.out_dir} is prepared already ({len(data.read_meta(args.out_dir)['shards'])} shards)")
            return
    shards = [n for n in os.listdir(args.out_dir) if n.startswith(("train_", "val_"))]
    if state is None and shards:
        raise SystemExit(f"error: {args.out_dir} holds shards ({shards[0]}, ...) but no prepare_state.json to continue "
                         f"from; give an empty --out_dir, or delete them")
    if state is None:
        state = {"settings": settings, "spec": tokenizer_spec(args, inputs), "shards": {}, "position": [0, 0, 0]}
    if args.max_tokens and args.max_tokens < sum(state["shards"].values()):
        raise SystemExit(f"error: {args.out_dir} holds {sum(state['shards'].values()):,} tokens of finished shards, "
                         f"more than --max_tokens={args.max_tokens:,}; give another --out_dir for a smaller sample")
    state.pop("done", None)
    spec = state["spec"]
    dtype = np.dtype(np.uint16 if data.Tokenizer(spec).vocab_size < 65536 else np.uint32)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the shards it lists are about to change
    k = len(state["shards"])  # what follows the finished shards: a half shard, a --max_tokens run's tail
    for name in shards:
        if name not in state["shards"]:
            os.remove(os.path.join(args.out_dir, name))
    save_json(state_path, state)

    written = start = sum(state["shards"].values())
    (f0, row0, skip), t0, shown = state["position"], time.time(), 0.0
    out, filled = None, 0
    tokens_at = lambda f, row: written / args.max_tokens if args.max_tokens else inputs.done(f, row)  # noqa: E731
    enough = lambda: args.max_tokens and written == args.max_tokens  # noqa: E731
    began = start / args.max_tokens if args.max_tokens else f0 / len(inputs)  # (no download to learn more)
    inputs.quiet()
    try:
        for f, row, lengths, tokens in tokenized(chunks(inputs, args.text_column, (f0, row0)), spec, args.procs):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            pos, skip = skip, 0  # a resumed run's first document may have begun in the last finished shard
            while pos < len(tokens) and not enough():
                cap = args.val_tokens if k == 0 else args.shard_tokens
                if args.max_tokens:
                    cap = min(cap, filled + args.max_tokens - written)
                out = out or open(os.path.join(args.out_dir, shard_name(k) + ".tmp"), "wb")
                take = min(cap - filled, len(tokens) - pos)
                tokens[pos:pos + take].astype(dtype).tofile(out)
                filled, pos, written = filled + take, pos + take, written + take
                if filled < cap or enough():
                    continue  # a --max_tokens run's tail is written below, but not finished: a longer run redoes it
                out.close()
                os.replace(out.name, out.name[:-len(".tmp")])
                doc = int(np.searchsorted(offsets, pos, side="right")) - 1  # where the next shard starts
                state["shards"][shard_name(k)], out, filled, k = cap, None, 0, k + 1
                state["position"] = [f, row + doc, pos - int(offsets[doc])]
                save_json(state_path, state)
            now = time.time()
            if now - shown > (1 if sys.stderr.isatty() else 60) or enough():
                shown, done = now, tokens_at(f, row + len(lengths))
                eta = (now - t0) * (1 - done) / max(done - began, 1e-9)
                print(f"{written:,} tokens, shard {k + 1}, file {f + 1}/{len(inputs)}: "
                      f"{(written - start) / (now - t0):,.0f} tokens/s, eta {eta / 60:.1f} min",
                      end="\r" if sys.stderr.isatty() else "\n", file=sys.stderr, flush=True)
            if enough():
                break
    finally:
        if out is not None:
            out.close()
        inputs.quiet()
        if sys.stderr.isatty() and shown:
            print(file=sys.stderr)
    if k + (filled > 0) < 2:
        raise SystemExit(f"error: the inputs hold {written:,} tokens, no more than --val_tokens={args.val_tokens:,}; "
                         f"lower it or give more text")
    shards = dict(state["shards"])
    if filled:  # the last, shorter shard
        os.replace(out.name, out.name[:-len(".tmp")])
        shards[shard_name(k)] = filled
    meta = {"vocab_size": data.Tokenizer(spec).vocab_size, "dtype": dtype.name, **spec, "shards": shards,
            "source": args.inputs or f"{args.repo}:{args.files}"}
    save_json(meta_path, meta)
    save_json(state_path, {**state, "done": args.max_tokens})
    seconds = time.time() - t0
    print(f"{written:,} tokens ({spec['tokenizer']}, vocab {meta['vocab_size']}, {dtype.name}): val "
          f"{shards['val_000000.bin']:,}, train {written - shards['val_000000.bin']:,} in {len(shards) - 1} shards; "
          f"{(written - start) / seconds:,.0f} tokens/s over {seconds:.1f} s; written to {args.out_dir}")


if __name__ == "__main__":
    main()
