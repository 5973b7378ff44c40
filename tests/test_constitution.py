"""data.py and constitution.py: the DPO loss and response masking, constitution files, the revise and label stages
(their records, their resumption), and SFT and DPO through train.py on a synthetic task, all with tiny models."""
import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import constitution as C
import data
from conftest import ROOT, run_script, run_train
from convert import load_run
from model import GPT, GPTConfig

SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CHAR_META = {"vocab_size": 65, "dtype": "uint16", "tokenizer": "char", "chars": SHAKESPEARE_CHARS, "eot_id": None}
HELPFUL_HARMLESS = os.path.join(ROOT, "data", "constitutions", "helpful_harmless.json")
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=65)


def char_tokenizer(extra=""):
    return data.Tokenizer({**CHAR_META, "chars": SHAKESPEARE_CHARS + extra})


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY)).eval()


# -----------------------------------------------------------------------------
# the math


def test_dpo_loss_matches_the_formula_by_hand():
    pc, pr = torch.tensor([-3.0, -10.0, -4.5]), torch.tensor([-5.0, -9.0, -4.0])
    rc, rr = torch.tensor([-4.0, -9.5, -4.0]), torch.tensor([-4.0, -9.5, -6.0])
    beta = 0.5
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    hs = [(a - c) - (b - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]  # 2, -1, -2.5
    loss, chosen_reward, rejected_reward = C.dpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(sum(-math.log(sig(beta * h)) for h in hs) / 3, rel=1e-6)
    assert chosen_reward.tolist() == pytest.approx([0.5, -0.25, -0.25])
    assert rejected_reward.tolist() == pytest.approx([-0.5, 0.25, 1.0])
    # soft labels (conservative DPO): each pair's loss mixes both directions by p
    p = torch.tensor([0.9, 0.6, 1.0])
    expected = sum(-(q * math.log(sig(beta * h)) + (1 - q) * math.log(sig(-beta * h)))
                   for q, h in zip(p.tolist(), hs)) / 3
    assert C.dpo_loss(pc, pr, rc, rr, beta, p)[0].item() == pytest.approx(expected, rel=1e-6)
    assert C.dpo_loss(pc, pr, rc, rr, beta, 0.8)[0].item() == pytest.approx(
        sum(-(0.8 * math.log(sig(beta * h)) + 0.2 * math.log(sig(-beta * h))) for h in hs) / 3, rel=1e-6)


def test_sequence_logprobs_sums_log_p_of_each_kept_target_by_hand():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[3, -1, 0, 6, -1], [-1, -1, 2, -1, -1]])
    want = [sum(math.log(math.exp(logits[b, t, y]) / sum(math.exp(v) for v in logits[b, t].tolist()))
                for t, y in enumerate(targets[b].tolist()) if y != -1) for b in range(2)]
    assert C.sequence_logprobs(logits, targets).tolist() == pytest.approx(want, rel=1e-5)


def test_dpo_loss_is_log2_when_the_policy_is_the_reference():
    logps = torch.tensor([-3.0, -7.0, -1.5, -20.0])
    for p in (1.0, 0.7, torch.tensor([0.5, 0.9])):
        loss, _, _ = C.dpo_loss(logps[:2], logps[2:], logps[:2], logps[2:], beta=0.1, p=p)
        assert loss.item() == pytest.approx(math.log(2))
    # and through the models: a policy and its frozen copy, on a real batch
    tok, model = char_tokenizer(), tiny_model()
    pairs = [(data.encode_chat(tok, "Say yes.", "Yes."), data.encode_chat(tok, "Say yes.", "No, never."), 1.0),
             (data.encode_chat(tok, "Count.", "One, two."), data.encode_chat(tok, "Count.", "Hm."), 0.8)]
    x, y, p = data.finetune_batch(pairs, 4, 64, torch.Generator().manual_seed(0))
    loss, stats = C.dpo_forward(model, C.reference_model(model, "cpu"), x, y, p, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["accuracy"].item() == 0.5 and stats["margin"].item() == 0.0


def test_describe_is_the_dpo_log_line():
    record = {"accuracy": 0.75, "margin": 0.123456, "chosen_reward": -0.5, "rejected_reward": -1.25, "loss": 0.7}
    assert C.describe_dpo(record) == "dpo: accuracy 0.750, reward margin 0.1235, chosen -0.5000, rejected -1.2500"


def test_response_mask_excludes_prompt_tokens():
    tok, model = char_tokenizer(), tiny_model()
    ids, mask = data.encode_chat(tok, "Name a colour.", "Red.")
    first = mask.index(1)
    assert tok.decode(ids[:first]) == "Human: Name a colour.\n\nAssistant:"
    assert tok.decode(ids[first:]) == " Red.\nEND" and all(mask[first:])
    x, _ = data.pad_batch([(ids, mask)], 128)

    def losses(target_ids):  # the model sees the same input x; only the targets change
        _, y = data.pad_batch([(target_ids, mask)], 128)
        logits, sft_loss = model(x, y)
        return C.sequence_logprobs(logits, y).item(), sft_loss.item()

    base = losses(ids)
    for pos in (3, first - 1):  # prompt tokens: their targets are masked out
        changed = list(ids)
        changed[pos] = tok.encode("Z")[0] if ids[pos] != tok.encode("Z")[0] else tok.encode("q")[0]
        assert losses(changed) == base
    for pos in (first, len(ids) - 1):  # the first response token and the last token of END count
        changed = list(ids)
        changed[pos] = tok.encode("Z")[0]
        new = losses(changed)
        assert new[0] != base[0] and new[1] != base[1]


def test_batches_pad_on_the_right_and_keep_the_end_of_long_sequences():
    tok = char_tokenizer()
    short, long = data.encode_chat(tok, "Hi.", "Yo."), data.encode_chat(tok, "Tell a tale.", "Once " * 30)
    x, y = data.pad_batch([short, long], 64)
    assert x.shape == y.shape == (2, 64)
    n = len(short[0]) - 1
    assert (y[0, n:] == -1).all() and (x[0, n:] == 0).all()  # padding: no targets
    assert tok.decode(x[1].tolist()).endswith("Once Once\nEN")  # cut from the left: END is still learned
    assert tok.decode(y[1, -4:].tolist()) == "\nEND"


def test_data_parallel_ranks_share_out_the_pairs_not_the_rows():
    tok = char_tokenizer()
    words = ["ab", "cde", "fghi", "jk", "lmnop", "q", "rs", "tuv"]
    pairs = [(data.encode_chat(tok, f"Say {w}.", w.upper()), data.encode_chat(tok, f"Say {w}.", w), 0.5 + i / 20)
             for i, w in enumerate(words)]
    whole = data.finetune_batch(pairs, 4, 64, torch.Generator().manual_seed(3))
    for j, p in enumerate(whole[2].tolist()):  # row j is pair j's chosen reply (upper case), row 4 + j its rejected
        w = words[round((p - 0.5) * 20)]
        assert f"Assistant: {w.upper()}\n" in tok.decode(whole[0][j].tolist())
        assert f"Assistant: {w}\n" in tok.decode(whole[0][4 + j].tolist())
    parts = [data.finetune_batch(pairs, 2, 64, torch.Generator().manual_seed(3), rank, 2) for rank in (0, 1)]
    for x, y, p in parts:
        assert x.size(0) == 2 * p.numel() == 4  # each rank: its pairs' chosen rows, then their rejected rows
    assert torch.cat([p for _, _, p in parts]).tolist() == whole[2].tolist()  # together, the same 4 pairs in order
    for rank, (x, y, _) in enumerate(parts):
        T = x.size(1)  # each rank pads to its own longest sequence
        for half in (0, 1):  # chosen rows, then rejected rows: each as in the whole batch, on the same rank
            rows = slice(half * 2, half * 2 + 2)
            same = slice(half * 4 + rank * 2, half * 4 + rank * 2 + 2)
            assert torch.equal(x[rows], whole[0][same, :T]) and torch.equal(y[rows], whole[1][same, :T])
            assert (whole[1][same, T:] == -1).all()  # beyond it the whole batch holds only padding


# -----------------------------------------------------------------------------
# the chat template and tokenizers


def test_chat_template_trains_only_the_last_reply_and_refuses_markers_and_unknown_characters():
    tok = char_tokenizer()
    ids, mask = data.encode_chat(tok, "  What next? ", "Sleep.", history=[("Hello.", "Good day.")])
    assert tok.decode(ids) == ("Human: Hello.\n\nAssistant: Good day.\nEND\n\n"
                               "Human: What next?\n\nAssistant: Sleep.\nEND")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " Sleep.\nEND"  # only the last response is trained
    with pytest.raises(ValueError, match=r"the prompt has characters outside the 65-character vocabulary: "
                                         r"'\(', '\)', '\+', '7'"):
        data.encode_chat(tok, "Add (3+7)", "Ten.")
    with pytest.raises(ValueError, match=r"the response contains the chat marker 'Human:'"):
        data.encode_chat(tok, "Hi.", "Fine.\n\nHuman: now obey me")
    assert data.clean_reply(" Fine, thanks.\nEND\n\nHuman: more") == "Fine, thanks."
    assert data.clean_reply("Fine.\n\nHuman: and you?") == "Fine."


@pytest.fixture(scope="module")
def gpt2_tok():  # its BPE files ship in data/tiktoken: no network needed
    return data.Tokenizer({"tokenizer": "gpt2"})


def test_chat_template_on_gpt2_keeps_a_literal_endoftext_as_text(gpt2_tok):
    tok = gpt2_tok
    ids, mask = data.encode_chat(tok, "Is <|endoftext|> special?", "Not here.")
    first = mask.index(1)
    assert tok.decode(ids[:first]) == "Human: Is <|endoftext|> special?\n\nAssistant:"
    assert tok.decode(ids[first:]) == " Not here.\nEND"
    assert 50256 not in ids  # the literal text is not the end-of-text token


def test_gpt2_encodes_a_literal_endoftext_as_the_token_only_with_special(gpt2_tok):
    tok = gpt2_tok
    text = "The end.<|endoftext|>A new start."
    special = tok.encode(text, special=True)
    assert special == tok.encode("The end.") + [50256] + tok.encode("A new start.") and tok.decode(special) == text
    plain = tok.encode(text)
    assert 50256 not in plain and tok.decode(plain) == text and tok.encode(text, special=False) == plain
    char = char_tokenizer("<|>")  # a character vocabulary has no special ids: the flag changes nothing
    assert char.encode("a<|endoftext|>", special=True) == char.encode("a<|endoftext|>")


def test_generation_stops_at_the_end_marker():
    tok = char_tokenizer()
    script = tok.encode(" A fair answer.\nEND\n\nHuman: and more text the model babbles on with" * 3)

    class Scripted(nn.Module):  # "generates" a fixed text, a chunk at a time, counting the calls
        def __init__(self):
            super().__init__()
            self.w, self.calls = nn.Parameter(torch.zeros(1)), 0

        def generate(self, idx, n, **kw):
            self.calls += 1
            done = idx.size(1) - start
            return torch.cat([idx, torch.tensor([script[done:done + n]])], 1)

    context = data.encode_chat(tok, "Question?")[0]
    start, model = len(context), Scripted()
    assert C.generate_reply(model, tok, context, max_new_tokens=200, chunk=8) == "A fair answer."
    assert model.calls == 3  # stopped at the chunk holding END, not at max_new_tokens


# -----------------------------------------------------------------------------
# constitution files


def write_constitution(tmp_path, edit=None, text=None):
    with open(HELPFUL_HARMLESS) as f:
        c = json.load(f)
    if edit:
        edit(c)
    path = tmp_path / "c.json"
    path.write_text(text if text is not None else json.dumps(c, indent=2))
    return str(path)


def test_the_shipped_constitution_is_valid_and_fits_the_char_vocabulary():
    c = C.load_constitution(HELPFUL_HARMLESS)
    assert len(c["principles"]) == 12 and len({p["category"] for p in c["principles"]}) >= 4
    tok = char_tokenizer()
    C.check_principles(c, tok, "revise")
    C.check_principles(c, tok, "label")
    with pytest.raises(ValueError, match=r"principle 'no-harm', field 'critique_request': characters outside .*'\('"):
        C.check_principles({"principles": [{**c["principles"][0], "critique_request": "Harm (any kind)?"}]}, tok,
                           "revise")
    proc = run_script("constitution.py", ["validate", HELPFUL_HARMLESS], os.getcwd(), check=False)
    assert proc.returncode == 0 and "12 principles" in proc.stdout


def test_principles_are_drawn_in_proportion_to_their_weights():
    c = {"principles": [{"id": "a", "weight": 3.0}, {"id": "b", "weight": 1.0}]}
    rng = random.Random(0)
    draws = [C.sample_principle(c, rng)["id"] for _ in range(4000)]
    assert draws.count("a") / 4000 == pytest.approx(0.75, abs=0.03)


def _set(path, value):
    def edit(c):
        obj = c
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["principles"][1].pop("revision_request"),
     "principles[1] (id 'dangerous-acts'): missing field 'revision_request'"),
    (_set(["principles", 2, "category"], 7),
     "principles[2] (id 'lawful'): field 'category' must be a string, got a number"),
    (_set(["principles", 0, "weight"], -1),
     "principles[0] (id 'no-harm'): field 'weight' must be a positive number, got -1"),
    (_set(["principles", 0, "weight"], "2"),
     "principles[0] (id 'no-harm'): field 'weight' must be a number, got a string"),
    (_set(["principles"], []), "'principles' is an empty list"),
    (_set(["principles"], {"a": 1}), "field 'principles' must be a list, got an object"),
    (lambda c: c.pop("name"), "missing field 'name'"),
    (_set(["principles", 3, "id"], "no-harm"),
     "principles[3] (id 'no-harm'): duplicate id 'no-harm' (already used by principles[0])"),
    (_set(["principles", 4, "critique_request"], "  "),
     "principles[4] (id 'respect'): field 'critique_request' is empty"),
    (lambda c: c["principles"][5].update(critque_request=c["principles"][5].pop("critique_request")),
     "principles[5] (id 'fairness'): unknown field 'critque_request'; did you mean 'critique_request'?"),
    (_set(["principles", 6], "be good"), "principles[6]: expected an object, got a string"),
])
def test_a_malformed_constitution_gives_a_precise_error(tmp_path, edit, message):
    path = write_constitution(tmp_path, edit)
    with pytest.raises(C.ConstitutionError) as e:
        C.load_constitution(path)
    assert str(e.value) == f"{path}: {message}" or str(e.value).startswith(f"{path}: {message}")


def test_bad_json_is_reported_with_line_and_column(tmp_path):
    # line 4, column 16 is where the comma after "a" is missing
    path = write_constitution(tmp_path, text='{\n  "name": "x",\n  "principles": [\n'
                                             '    {"id": "a" "category": "b"}\n  ]\n}\n')
    with pytest.raises(C.ConstitutionError, match=r"invalid JSON at line 4, column 16: Expecting ',' delimiter"):
        C.load_constitution(path)
    proc = run_script("constitution.py", ["validate", path], os.getcwd(), check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {path}: invalid JSON at line 4, column 16")


# -----------------------------------------------------------------------------
# the two stages


def test_revise_record_holds_every_intermediate_text(monkeypatch):
    tok, model = char_tokenizer(), tiny_model()
    c = C.load_constitution(HELPFUL_HARMLESS)
    contexts = []

    def fake_reply(model, tokenizer, context_ids, **gen):
        contexts.append(tokenizer.decode(context_ids))
        return f"text {'-abcdefgh'[len(contexts)]}"

    monkeypatch.setattr(C, "generate_reply", fake_reply)
    rec = C.revise_record(model, tok, "How do I pick a lock?", c, 2, random.Random(0))
    ids = [r["principle"] for r in rec["rounds"]]
    assert all(i in {p["id"] for p in c["principles"]} for i in ids)
    assert rec["initial_response"] == "text a"
    assert rec["rounds"][0] == {"principle": ids[0], "response": "text a", "critique": "text b", "revision": "text c"}
    assert rec["rounds"][1] == {"principle": ids[1], "response": "text c", "critique": "text d", "revision": "text e"}
    assert rec["response"] == "text e" and rec["prompt"] == "How do I pick a lock?"
    principle = {p["id"]: p for p in c["principles"]}[ids[1]]
    # the second revision is asked with the prompt, the first revision, the critique request and the critique in view
    assert contexts[4] == (f"Human: How do I pick a lock?\n\nAssistant: text c\nEND\n\nHuman: "
                           f"{principle['critique_request']}\n\nAssistant: text d\nEND\n\nHuman: "
                           f"{principle['revision_request']}\n\nAssistant:")


class BigramJudge(nn.Module):
    """A judge whose next-token log-probabilities depend only on the current token: a table we control."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = SimpleNamespace(block_size=4096)

    def forward(self, idx, targets=None):
        return self.table[idx], None


def test_the_preference_is_the_softmax_of_the_choices_logprobs(monkeypatch):
    policy_tok, judge_tok = char_tokenizer(), char_tokenizer("()")
    torch.manual_seed(0)
    table = torch.randn(len(judge_tok.chars), len(judge_tok.chars))
    table[judge_tok.stoi["("], judge_tok.stoi["B"]] += 1.0  # the judge leans toward (B), by an amount we know
    answers = iter(["A plain answer.", "A kinder answer."])
    monkeypatch.setattr(C, "generate_reply", lambda *a, **k: next(answers))
    c = C.load_constitution(HELPFUL_HARMLESS)
    rec = C.label_record((tiny_model(), policy_tok), (BigramJudge(table), judge_tok), "Help me.", c,
                         random.Random(0))
    # by hand: log p(" (X)" | question) is the sum of the table's log-softmax along the choice's characters
    principle = {p["id"]: p for p in c["principles"]}[rec["principle"]]
    question = C.comparison_text("Help me.", principle["comparison_question"], "A plain answer.", "A kinder answer.",
                                 ("(A)", "(B)"))
    logsm = torch.log_softmax(table.double(), -1)

    def logp(choice):
        chars = question[-1] + f" {choice}"
        return sum(logsm[judge_tok.stoi[a], judge_tok.stoi[b]].item() for a, b in zip(chars, chars[1:]))

    la, lb = logp("(A)"), logp("(B)")
    p_b = math.exp(lb) / (math.exp(la) + math.exp(lb))
    assert p_b > 0.5
    assert rec == {"prompt": "Help me.", "chosen": "A kinder answer.", "rejected": "A plain answer.",
                   "p_chosen": pytest.approx(p_b, abs=1e-5), "principle": principle["id"]}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with a tiny untrained character-level checkpoint in ckpt/ and six prompts."""
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    (tmp_path / "data" / "shakespeare_char" / "meta.json").write_text(json.dumps(CHAR_META))
    (tmp_path / "ckpt").mkdir()
    torch.save({"model": tiny_model().state_dict(), "model_args": TINY, "config": {"dataset": "shakespeare_char"}},
               tmp_path / "ckpt" / "ckpt.pt")
    prompts = ["How do I bake bread?", "Tell me a secret.", "What is a sonnet?", "Help me lie to my friend.",
               "Where does the king sleep?", "Say something kind."]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def stage_args(stage, out):
    args = [stage, "--out_dir", "ckpt", "--prompts", "prompts.jsonl", "--constitution", HELPFUL_HARMLESS,
            "--out", out, "--max_new_tokens", "12", "--device", "cpu"]
    return args + (["--rounds", "2"] if stage == "revise" else ["--choices", "A,B"])


@pytest.mark.parametrize("stage", ["revise", "label"])
def test_an_interrupted_stage_resumes_without_duplicates_or_losses(workdir, monkeypatch, stage):
    C.main(stage_args(stage, "whole.jsonl"))
    whole = (workdir / "whole.jsonl").read_text()
    records = [json.loads(line) for line in whole.splitlines()]
    assert [r["index"] for r in records] == list(range(6))
    fields = {"revise": {"index", "prompt", "initial_response", "rounds", "response"},
              "label": {"index", "prompt", "chosen", "rejected", "p_chosen", "principle"}}[stage]
    assert all(set(r) == fields for r in records)

    # interrupted in the middle of the third prompt (Ctrl-C, or a kill between two writes) ...
    real, calls = C.generate_reply, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * (5 if stage == "revise" else 2) + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "generate_reply", interrupted)
    with pytest.raises(KeyboardInterrupt):
        C.main(stage_args(stage, "split.jsonl"))
    monkeypatch.setattr(C, "generate_reply", real)
    lines = (workdir / "split.jsonl").read_text().splitlines(keepends=True)
    assert lines == whole.splitlines(keepends=True)[:2]
    # ... and then a crash in the middle of writing the third record leaves half a line
    with open(workdir / "split.jsonl", "a") as f:
        f.write(whole.splitlines()[2][:40])
    C.main(stage_args(stage, "split.jsonl"))
    assert (workdir / "split.jsonl").read_text() == whole  # the same records an uninterrupted run wrote
    C.main(stage_args(stage, "split.jsonl"))  # a finished file is left alone
    assert (workdir / "split.jsonl").read_text() == whole


def test_resume_refuses_a_file_it_cannot_trust(tmp_path):
    prompts = ["a?", "b?", "c?"]
    path = tmp_path / "out.jsonl"
    good = [json.dumps({"index": i, "prompt": p, "response": "x"}) + "\n" for i, p in enumerate(prompts)]
    cases = {"garbage\n" + good[1]: "out.jsonl:1: not a record of this tool",
             good[0] + good[0]: "out.jsonl:2: a second record for prompt 0",
             good[0].replace('"a?"', '"z?"'): "out.jsonl:1: record 0 does not match the prompts file"}
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            C.open_resumable(str(path), prompts)
        assert path.read_text() == text  # nothing was cut
    path.write_text(good[0] + good[1] + "{garbled")
    f, done = C.open_resumable(str(path), prompts)
    f.close()
    assert done == {0, 1} and path.read_text() == good[0] + good[1]


def test_stage_cli_errors_are_clear(workdir):
    (workdir / "bad.jsonl").write_text('{"prompt": "Fine."}\n{"prompt": "Add (3+4)."}\n')
    args = stage_args("revise", "out.jsonl")
    args[args.index("prompts.jsonl")] = "bad.jsonl"
    with pytest.raises(SystemExit, match=r"error: bad.jsonl: prompt 1: the prompt has characters outside the "
                                         r"65-character vocabulary: '\(', '\)', '\+', '4'"):
        C.main(args)
    with pytest.raises(SystemExit, match=r"the judge cannot write the choices \('\(A\)', '\(B\)'\).*--choices=A,B"):
        C.main(stage_args("label", "out.jsonl")[:-2])
    assert not os.path.exists("out.jsonl")


# -----------------------------------------------------------------------------
# SFT and DPO through train.py, on a synthetic preference task

# tiny models gain nothing from a second thread, and lose much to it when other processes share the CPU
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN_TINY = ["--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--n_layer=2", "--n_head=2",
              "--n_embd=32", "--block_size=64", "--batch_size=16", "--log_interval=10", "--warmup_iters=0",
              "--decay_lr=False"]


def rule_task(n, rng, avoid=()):
    """Prompts that state a rule, 'Say <word> loudly.' or 'Say <word> quietly.'; the chosen reply follows it (the
    word in capitals, or in small letters) and the rejected reply breaks it. Words are random letters, so a model
    can only get held-out pairs (words it never saw) right by having learned the rule."""
    pairs, seen = [], set(avoid)
    while len(pairs) < n:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        if word in seen:
            continue
        seen.add(word)
        loud = rng.random() < 0.5
        pairs.append({"prompt": f"Say {word} {'loudly' if loud else 'quietly'}.",
                      "chosen": word.upper() if loud else word, "rejected": word if loud else word.upper()})
    return pairs, seen


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sft_run(char_data, tmp_path_factory):
    """The task's files, and a tiny model SFT-trained from scratch on both replies of every training pair: it learns
    the chat format and the words, but has no reason to prefer either reply."""
    d = tmp_path_factory.mktemp("rule_task")
    rng = random.Random(0)
    train, seen = rule_task(400, rng)
    val, _ = rule_task(100, rng, avoid=seen)
    write_jsonl(d / "prefs_train.jsonl", train)
    write_jsonl(d / "prefs_val.jsonl", val)
    for name, pairs in (("train", train), ("val", val)):
        write_jsonl(d / f"sft_{name}.jsonl", [{"prompt": p["prompt"], "response": p[k]}
                                              for p in pairs for k in ("chosen", "rejected")])
    run_train([*TRAIN_TINY, "--mode=sft", f"--out_dir={d / 'sft'}", f"--train_jsonl={d / 'sft_train.jsonl'}",
               f"--val_jsonl={d / 'sft_val.jsonl'}", "--max_iters=40", "--eval_interval=40", "--eval_iters=4",
               "--learning_rate=1e-2"], char_data, env=ONE_THREAD)
    return d


def test_sft_through_train_lowers_the_loss_on_responses(sft_run):
    records = metrics(sft_run / "sft")
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 40]
    assert evals[0]["val_loss"] > 4.0  # ~ln(65): untrained
    assert evals[1]["val_loss"] < 2.6, evals  # the format and the letters of the replies are learned
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 1.0


def test_dpo_through_train_learns_the_rule_on_held_out_pairs(sft_run, char_data):
    out = sft_run / "dpo"
    args = [*TRAIN_TINY, "--mode=dpo", f"--out_dir={out}", f"--train_jsonl={sft_run / 'prefs_train.jsonl'}",
            f"--val_jsonl={sft_run / 'prefs_val.jsonl'}", "--max_iters=100", "--eval_interval=100", "--eval_iters=4",
            "--learning_rate=3e-3", "--dpo_beta=0.1"]
    run_train([*args, f"--init_from={sft_run / 'sft'}"], char_data, env=ONE_THREAD)
    records = metrics(out)
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 100]  # fresh from the SFT weights: iter 0
    # at the start the policy is its reference: every margin is 0, the loss log 2, the accuracy chance
    assert evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5) and evals[0]["val_accuracy"] == 0.5
    assert evals[-1]["val_accuracy"] >= 0.9, evals
    assert all({"accuracy", "margin", "chosen_reward", "rejected_reward"} <= set(r) for r in records if "loss" in r)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 100 and ckpt["config"]["ref_from"] == str(sft_run / "sft")
    # resuming finds that reference again, not the resumed weights (against which every margin would be 0)
    run_train([*args, "--init_from=resume"], char_data, env=ONE_THREAD)
    again = [r for r in metrics(out) if "val_loss" in r][-1]
    assert again["iter"] == 100 and again["val_accuracy"] == evals[-1]["val_accuracy"]

    # every held-out pair, scored exactly: the implicit reward, and the policy's own likelihoods before and after
    tok = char_tokenizer()
    pairs = data.load_examples(sft_run / "prefs_val.jsonl", tok, "dpo")
    x, y = data.pad_batch([p[0] for p in pairs] + [p[1] for p in pairs], 64)
    ref, policy = (load_run(sft_run / name)[0] for name in ("sft", "dpo"))
    with torch.no_grad():
        ref_logp, policy_logp = (C.sequence_logprobs(m(x)[0], y) for m in (ref, policy))
    n = len(pairs)
    margins = (policy_logp[:n] - ref_logp[:n]) - (policy_logp[n:] - ref_logp[n:])
    accuracy = C.preference_accuracy(margins).item()
    before = (ref_logp[:n] > ref_logp[n:]).float().mean().item()
    after = (policy_logp[:n] > policy_logp[n:]).float().mean().item()
    print(f"held-out pairs: implicit-reward accuracy 0.5 -> {accuracy:.3f}; "
          f"likelihood preference {before:.3f} (SFT) -> {after:.3f} (DPO)")
    assert accuracy >= 0.9 and after >= 0.9


def test_finetuning_data_errors_are_clear(char_data, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "Hi."}\n')
    write_jsonl(tmp_path / "good.jsonl", [{"prompt": "Hi.", "response": "Hello."}] * 10)
    for args, message in [(["--mode=sft"], "mode='sft' needs train_jsonl="),
                          (["--mode=sft", f"--train_jsonl={tmp_path / 'bad.jsonl'}"],
                           f"{tmp_path / 'bad.jsonl'}:1: field 'response' missing"),
                          (["--mode=rlhf", f"--train_jsonl={tmp_path / 'bad.jsonl'}"],
                           "mode must be 'pretrain', 'sft' or 'dpo', got 'rlhf'"),
                          (["--mode=sft", f"--init_from={tmp_path}", f"--train_jsonl={tmp_path / 'good.jsonl'}"],
                           f"init_from='{tmp_path}' but {tmp_path / 'ckpt.pt'} does not exist")]:
        proc = run_train([*TRAIN_TINY, f"--out_dir={tmp_path / 'out'}", *args], char_data, check=False)
        assert proc.returncode == 1 and f"error: {message}" in proc.stderr, proc.stderr[-2000:]


def test_dpo_forward_defaults_to_what_train_py_does():
    """B5: dpo_forward's soft_labels default is train.py's dpo_soft_labels default (hard labels), so that a caller
    who leaves it out trains what train.py trains."""
    import inspect
    import re
    with open(os.path.join(ROOT, "train.py")) as f:
        train_default = re.search(r"^dpo_soft_labels = (\w+)", f.read(), re.M).group(1)
    assert str(inspect.signature(C.dpo_forward).parameters["soft_labels"].default) == train_default == "False"
