"""convert.py: Hugging Face export and import checked against transformers itself, bits per byte and
multiple-choice accuracy against naive loops, and lm-evaluation-harness against our own accuracy."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import evaluation
import convert
from conftest import ROOT, run_script, run_train
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

CHARS = "\n !,.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # 60 tokens; the models have 64 rows
SMALL = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=64)
MODELS = {  # each class with the options that map onto it
    "llama": dict(n_kv_head=2, tie_embeddings=False, bias=True, rope_theta=5e5, norm_eps=1e-6),
    "llama_mqa_tied": dict(n_kv_head=1),
    "qwen3": dict(qk_norm=True, n_kv_head=2, tie_embeddings=False),
    "mixtral": dict(n_expert=4, top_k=2, expert_hidden=48, n_kv_head=2),
    "gpt2": dict(layout="gpt2", bias=True),
}
CLASSES = {"llama": "LlamaForCausalLM", "llama_mqa_tied": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel"}


def perturbed(model, seed=0):
    """Norm gains, biases and weights moved off their initial values, so a mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_run(path, seed=0, **overrides):
    """A run directory as train.py writes it (ckpt.pt), its dataset's meta.json in ./data/tiny (CHARS)."""
    os.makedirs("data/tiny", exist_ok=True)
    with open("data/tiny/meta.json", "w") as f:
        json.dump({"vocab_size": len(CHARS), "tokenizer": "char", "chars": CHARS, "dtype": "uint16"}, f)
    torch.manual_seed(seed)
    model = perturbed(GPT(GPTConfig(**{**SMALL, **overrides})), seed)
    os.makedirs(path, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_args": dict(vars(model.config)), "iter_num": 7,
                "best_val_loss": 1.0, "config": {"dataset": "tiny"}}, os.path.join(path, "ckpt.pt"))
    return model


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # convert.py finds a run's data/<dataset>/meta.json from here, as train.py does
    return tmp_path


def hf_greedy(hf, idx, n):
    return hf.generate(idx, max_new_tokens=n, do_sample=False, pad_token_id=0)[:, idx.size(1):]


# ---------------------------------------------------------------------------------------------------------------------
# export, then import


@pytest.mark.parametrize("name", MODELS)
def test_export_loads_in_transformers_with_the_same_logits_and_imports_back_identically(name, workdir):
    ours = make_run("run", **MODELS[name])
    assert convert.export_hf("run", "hf") == CLASSES[name]
    hf = transformers.AutoModelForCausalLM.from_pretrained("hf").eval()
    assert type(hf).__name__ == CLASSES[name]
    idx = torch.randint(0, len(CHARS), (2, 32), generator=torch.Generator().manual_seed(1))
    back = convert.from_hf("hf").eval()
    with torch.no_grad():
        want = ours(idx)[0][..., :len(CHARS)]  # the padded rows are not exported
        theirs = hf(idx).logits
        assert torch.equal(back(idx)[0], want)  # a round trip is renames only: bit for bit
    assert theirs.shape == want.shape and (theirs - want).abs().max().item() <= 1e-4
    start = idx[:1, :8]  # (ours would be free to pick a padded row: a random model has not learnt to avoid them)
    assert torch.equal(hf_greedy(hf, start, 20), back.generate(start, 20, temperature=0)[:, 8:])


def test_a_run_saved_before_w13_loads_and_exports_as_the_same_model(workdir):
    """Runs saved before gate and up became one parameter hold each MoE layer's mlp.w1 and mlp.w3: the model loads
    (moe.py joins them) and exports (Mixtral's w1 and w3) exactly as the same run saved today."""
    from safetensors.torch import load_file
    ours = make_run("new", **MODELS["mixtral"])
    ckpt = torch.load("new/ckpt.pt", weights_only=True)
    old = {}
    for name, w in ckpt["model"].items():
        if name.endswith("mlp.w13"):  # (E, 2, hidden, in): gate, up
            old[name[:-1]], old[name[:-2] + "3"] = w[:, 0].clone(), w[:, 1].clone()
        else:
            old[name] = w
    os.makedirs("old")
    torch.save({**ckpt, "model": old}, "old/ckpt.pt")
    loaded = convert.load_run("old")[0].state_dict()
    for name, w in ours.state_dict().items():
        assert torch.equal(loaded[name], w), name
    convert.export_hf("new", "hf_new"), convert.export_hf("old", "hf_old")
    new, exported = load_file("hf_new/model.safetensors"), load_file("hf_old/model.safetensors")
    assert sorted(new) == sorted(exported)
    for name in new:
        assert torch.equal(new[name], exported[name]), name
    from checkpoint import restore  # its optimizer state does not: resuming it says so, and what to do instead
    with pytest.raises(ValueError, match="before MoE layers held gate and up as one weight.*init_from="):
        restore({**ckpt, "model": old}, ours, [], None, None)


def test_config_states_the_values_whose_hugging_face_defaults_differ(workdir):
    make_run("run", **MODELS["llama"])
    convert.export_hf("run", "hf")
    with open("hf/config.json") as f:
        c = json.load(f)
    assert c["rms_norm_eps"] == 1e-6 and c["tie_word_embeddings"] is False and c["vocab_size"] == len(CHARS)
    assert c["rope_theta"] == 5e5 and c["rope_parameters"]["rope_theta"] == 5e5  # older readers want the top level
    assert c["attention_bias"] is True and c["mlp_bias"] is True and c["num_key_value_heads"] == 2
    assert c["bos_token_id"] is None and c["eos_token_id"] is None  # a character vocabulary has none: not 1 and 2


@pytest.mark.parametrize("option, value", [("dre", True), ("n_shared_expert", 1), ("router_score", "sigmoid"),
                                           ("moe_balance", "bias"), ("capacity_factor", 1.25), ("moe_every", 2),
                                           ("router_renormalize", False), ("top_k", 1)])
def test_options_with_no_hugging_face_equivalent_are_refused_by_name_with_the_fix(option, value):
    """N3: a refusal names the option and the setting that exports; B10: top_k=1 is one of them (Mixtral would weigh
    the one expert by 1, nanothink by its router probability)."""
    config = GPTConfig(**{**SMALL, "n_layer": 4, "n_expert": 4, option: value})
    with pytest.raises(ValueError, match=f"^{option}=.*; a run trained with --{option}="
                                         f"{GPTConfig.defaults()[option]} can be$"):
        convert.hf_config(config, 60)


def test_a_top_1_mixture_would_compute_something_else_in_mixtral():
    """B10, the reason for the refusal above: Mixtral's top-1 weighs the expert by 1, ours by its probability."""
    torch.manual_seed(0)
    ours = perturbed(GPT(GPTConfig(**{**SMALL, "n_expert": 4, "top_k": 1})))
    hf_cfg = convert.hf_config(GPTConfig(**{**SMALL, "n_expert": 4, "top_k": 2}), 64)[1]
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**hf_cfg, "num_experts_per_tok": 1})).eval()
    hf.load_state_dict(convert.to_hf_weights(ours.config, ours.state_dict(), 64), strict=False)
    idx = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max() > 1e-3


def test_import_skips_a_rotary_table_and_names_a_weight_it_has_no_place_for(tmp_path):
    """B2: older Llama files hold self_attn.rotary_emb.inv_freq (skipped: nanothink computes it); any other weight
    without a place is named, not a bare StopIteration."""
    hf = random_hf("llama")
    config, w = {**hf.config.to_dict(), "architectures": ["LlamaForCausalLM"]}, dict(hf.state_dict())
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    ours = convert.from_hf_weights(config, {**w, **extra}).eval()
    idx = torch.randint(0, 80, (1, 16))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="no place for: model.layers.1.mlp.extra_proj.weight"):
        convert.from_hf_weights(config, {**w, "model.layers.1.mlp.extra_proj.weight": torch.ones(2, 2)})


def test_a_distributed_checkpoint_exports_and_becomes_a_ckpt_pt(workdir):
    from checkpoint import save_sharded
    model = make_run("run", **MODELS["qwen3"])
    os.remove("run/ckpt.pt")
    opt = torch.optim.AdamW(model.parameters())
    save_sharded("run", model, [opt], {"model_args": dict(vars(model.config)), "config": {"dataset": "tiny"},
                                       "iter_num": 3, "best_val_loss": 2.0})
    convert.export_hf("run", "hf")
    idx = torch.randint(0, len(CHARS), (1, 16))
    with torch.no_grad():
        assert torch.equal(convert.from_hf("hf").eval()(idx)[0], model(idx)[0][..., :len(CHARS)])
    convert.dcp_to_ckpt("run")
    ckpt = torch.load("run/ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 3 and all(torch.equal(ckpt["model"][k], v) for k, v in model.state_dict().items())


def cli(*args):
    return run_script("convert.py", args, os.getcwd(), check=False)


def test_bad_convert_commands_end_in_one_error_line_and_leave_the_target_alone(workdir):
    make_run("dre_run", dre=True, n_layer=3)
    make_run("run")
    os.makedirs("taken")
    open("taken/keep", "w").close()
    for args, message in [(("missing", "hf"), "run directory missing does not exist"),
                          (("dre_run", "hf"), "dre=True cannot be exported"),
                          (("run", "taken"), "taken already exists; pass --force")]:
        proc = cli(*args)
        assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), \
            (args, proc.stderr)
    assert os.listdir("taken") == ["keep"] and not os.path.exists("hf")
    os.makedirs("empty")
    for args, error, message in [(["empty", "hf"], FileNotFoundError, "empty/ckpt.pt not found, nor a distributed"),
                                 (["run"], ValueError, "give either HF_DIR"),
                                 (["run", "--ckpt"], FileNotFoundError, "no distributed checkpoint")]:
        with pytest.raises(error, match=message):  # the same messages, in process (each command costs seconds)
            convert.main(args)
    convert.main(["run", "taken", "--force"])
    assert sorted(os.listdir("taken")) == ["config.json", "generation_config.json", "model.safetensors",
                                           "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


# ---------------------------------------------------------------------------------------------------------------------
# import of models made by transformers


def random_hf(name):
    common = dict(vocab_size=80, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, bos_token_id=None, eos_token_id=None)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common, intermediate_size=96, rope_theta=5e5, rms_norm_eps=1e-6,
                                                 attention_bias=True, mlp_bias=True),
        "qwen3": lambda: transformers.Qwen3Config(**common, intermediate_size=96, head_dim=16,
                                                 tie_word_embeddings=True),
        "mixtral": lambda: transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=4,
                                                     num_experts_per_tok=2),
        "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=80,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                bos_token_id=None, eos_token_id=None),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[name]())
    return perturbed(model)


@pytest.mark.parametrize("name", ["llama", "qwen3", "mixtral", "gpt2"])
def test_a_random_hugging_face_model_imports_with_the_same_logits_and_greedy_tokens(name, tmp_path):
    hf = random_hf(name)
    hf.save_pretrained(tmp_path)
    ours = convert.from_hf(str(tmp_path)).eval()
    idx = torch.randint(0, 80, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4
    start = idx[:1, :8]
    assert torch.equal(ours.generate(start, 20, temperature=0)[:, 8:], hf_greedy(hf, start, 20))


def test_import_refuses_what_nanothink_lacks_by_name():
    base = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4, intermediate_size=96,
                num_hidden_layers=2, max_position_embeddings=32, vocab_size=80)
    for extra, message in [({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type="),
                           ({"head_dim": 32}, "head_dim="), ({"attention_bias": True}, "mlp_bias="),
                           ({"architectures": ["BertForMaskedLM"]}, "architecture BertForMaskedLM")]:
        with pytest.raises(ValueError, match=message):
            convert.config_from_hf({**base, **extra})


# ---------------------------------------------------------------------------------------------------------------------
# tokenizers


def test_exported_character_tokenizer_encodes_and_decodes_as_the_vocabulary(workdir):
    make_run("run")
    convert.export_hf("run", "hf")
    tok = transformers.AutoTokenizer.from_pretrained("hf")
    ours = data.Tokenizer({"tokenizer": "char", "chars": CHARS})
    text = "ROMEO:\nWhat, ho! apothecary?\n\n  Come; sir."
    assert tok(text)["input_ids"] == ours.encode(text) and tok.decode(ours.encode(text)) == text
    assert data.Tokenizer({"tokenizer": "hf:hf"}).encode(text) == ours.encode(text)


def test_exported_gpt2_tokenizer_matches_tiktoken(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without the cached BPE files
        pytest.skip(f"tiktoken's gpt2 files are not available: {e}")
    convert.write_tokenizer({"tokenizer": "gpt2"}, tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n  héllo wörld 日本語 12345 "
            "don't  'll\t\ttabs\r\n    trailing   ")
    assert tok(text)["input_ids"] == enc.encode(text) and tok.decode(enc.encode(text)) == text
    assert tok("a<|endoftext|>b")["input_ids"] == enc.encode("a<|endoftext|>b", allowed_special="all")
    assert tok.eos_token_id == 50256 and len(tok) == 50257


# ---------------------------------------------------------------------------------------------------------------------
# evaluations


def test_bits_per_byte_is_the_mean_surprisal_per_byte_of_every_predicted_token():
    torch.manual_seed(0)
    model = perturbed(GPT(GPTConfig(**{**SMALL, "block_size": 8})))
    tokenizer = data.Tokenizer({"tokenizer": "char", "chars": CHARS + "é"})  # é is two bytes
    ids = np.random.default_rng(0).integers(0, len(CHARS), 30)
    ids[[4, 9, 10, 21]] = len(CHARS)  # é, after the first token: bytes per token is not 1 either way
    bits, n_bytes = 0.0, 0
    with torch.no_grad():  # token by token: windows of 8 starting at 0, 8, 16, ...; token t sees its window so far
        for t in range(1, len(ids)):
            start = (t - 1) // 8 * 8
            logits = model(torch.tensor(ids[start:t])[None])[0][0, -1]
            bits -= logits.log_softmax(-1)[ids[t]].item() / math.log(2)
            n_bytes += len(tokenizer.decode([int(ids[t])]).encode())
    assert evaluation.bits_per_byte(model, tokenizer, ids, batch_size=3) == pytest.approx(bits / n_bytes, rel=1e-5)


ITEMS = [{"context": "the king said", "endings": ["yes.", "no, no!", "Go away."], "label": 1},
         {"context": "ROMEO: my", "endings": ["love", "sword and shield", "dear"], "label": 0},
         {"context": "Who goes", "endings": ["there?", "home", "where, sir?"], "label": 2},
         {"context": "A", "endings": ["horse!", "kingdom for a horse"], "label": 1}]


def test_choice_accuracy_matches_a_loop_over_each_ending_token(tmp_path):
    torch.manual_seed(0)
    model = perturbed(GPT(GPTConfig(**SMALL)))
    tokenizer = data.Tokenizer({"tokenizer": "char", "chars": CHARS})
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    hits = {"acc": 0, "acc_norm": 0, "acc_token": 0}
    with torch.no_grad():
        for r in ITEMS:
            scores = []
            for ending in r["endings"]:
                text, ll = r["context"] + " " + ending, 0.0
                for t in range(len(r["context"]), len(text)):
                    prefix = torch.tensor(tokenizer.encode(text[:t]))[None]
                    ll += model(prefix)[0][0, -1, :len(CHARS)].log_softmax(-1)[CHARS.index(text[t])].item()
                scores.append({"acc": ll, "acc_norm": ll / len(ending), "acc_token": ll / (len(ending) + 1)})
            for k in hits:
                hits[k] += max(range(len(scores)), key=lambda j: scores[j][k]) == r["label"]
    got = evaluation.choice_accuracy(model, tokenizer, evaluation.read_choices(path))
    assert got == {k: v / len(ITEMS) for k, v in hits.items()}


def test_malformed_choice_items_name_the_line_and_field(tmp_path):
    for line, message in [({"context": "a", "endings": ["b"], "label": 0}, "2: field 'endings'"),
                          ({"context": "a", "endings": ["b", "c"], "label": 2}, "2: field 'label'"),
                          ({"endings": ["b", "c"], "label": 0}, "2: field 'context' missing")]:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(ITEMS[0]) + "\n" + json.dumps(line) + "\n")
        with pytest.raises(ValueError, match=message):
            evaluation.read_choices(path)


@pytest.mark.slow
def test_lm_eval_harness_agrees_with_our_accuracy_on_an_exported_run(workdir, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_run("run", **MODELS["llama"])
    convert.export_hf("run", "hf")
    items = [{"context": c, "endings": e, "label": i % len(e)} for i, (c, e) in enumerate(
        [(r["context"] + s, r["endings"]) for s in ("", " and", ".") for r in ITEMS])]
    with open("items.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in items)
    os.makedirs("tasks")
    with open("tasks/local_choices.yaml", "w") as f:  # a HellaSwag-like task over the local file
        f.write(f"task: local_choices\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {os.path.abspath('items.jsonl')}\ntest_split: test\noutput_type: multiple_choice\n"
                f"doc_to_text: '{{{{context}}}}'\ndoc_to_choice: '{{{{endings}}}}'\ndoc_to_target: '{{{{label}}}}'\n"
                f"metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    # a character vocabulary has no end-of-text token, which lm-eval wants to start empty contexts with: "\n" is id 0
    out = lm_eval.simple_evaluate(model="hf", model_args="pretrained=hf,dtype=float32,prefix_token_id=0",
                                  tasks=["local_choices"], task_manager=TaskManager(include_path="tasks"),
                                  device="cpu", batch_size=4)
    theirs = out["results"]["local_choices"]
    ours = evaluation.choice_accuracy(*convert.load_run("run")[:2], evaluation.read_choices("items.jsonl"))
    assert theirs["acc,none"] == pytest.approx(ours["acc"]) and theirs["acc_norm,none"] == pytest.approx(
        ours["acc_norm"])


# ---------------------------------------------------------------------------------------------------------------------
# train.py and sample.py


def test_train_fine_tunes_an_hf_folder_and_reports_bits_per_byte(char_data, tmp_path):
    with open(char_data / "data" / "shakespeare_char" / "meta.json") as f:
        chars = json.load(f)["chars"]
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(chars), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    run_train(["--dataset=shakespeare_char", f"--init_from=hf:{tmp_path / 'hf'}", f"--out_dir={out}",
               "--max_iters=2", "--eval_iters=2", "--block_size=32", "--batch_size=4", "--device=cpu",
               "--dtype=float32"], char_data, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with open(out / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    # Tiny Shakespeare is ASCII: a byte per character, so bits per byte is the val loss in bits
    assert evals and all(r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2)) for r in evals)
    assert torch.load(out / "ckpt.pt", weights_only=True)["model_args"]["n_embd"] == 32


def test_sample_generates_from_an_hf_folder_with_its_own_tokenizer(workdir):
    ours = make_run("run", vocab_size=len(CHARS))
    convert.export_hf("run", "hf")
    proc = run_script("sample.py", ["--init_from=hf:hf", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=12",
                                    "--temperature=0", "--device=cpu"], os.getcwd(), check=False)
    assert proc.returncode == 0, proc.stderr
    tok = data.Tokenizer({"tokenizer": "char", "chars": CHARS})
    want = tok.decode(ours.generate(torch.tensor([tok.encode("ROMEO:")]), 12, temperature=0)[0].tolist())
    assert proc.stdout.startswith(want + "\n")


def test_a_run_from_an_hf_folder_keeps_its_tokenizer_through_resume_and_fine_tuning(workdir):
    """B1: a run started from hf:FOLDER encodes its conversations with that folder's tokenizer, saves it with every
    checkpoint, and keeps it when resumed (as torchrun's restart does) and when another run fine-tunes from it;
    sample.py then decodes with it, from any directory. The dataset's own meta.json (same size, another order of
    the characters) is what a run fell back to before."""
    make_run("run", vocab_size=len(CHARS))
    convert.export_hf("run", "hf")
    os.makedirs("data/other")
    with open("data/other/meta.json", "w") as f:  # the same characters in another order: same vocab_size
        json.dump({"vocab_size": len(CHARS), "tokenizer": "char", "chars": CHARS[::-1], "dtype": "uint16"}, f)
    with open("chat.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n" for w in ("yes", "no", "maybe") * 4)
    args = ["--dataset=other", "--mode=sft", "--train_jsonl=chat.jsonl", "--block_size=32", "--batch_size=2",
            "--eval_iters=1", "--eval_interval=2", "--device=cpu", "--dtype=float32", "--learning_rate=1e-6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_train([*args, "--init_from=hf:hf", "--out_dir=sft", "--max_iters=2"], workdir, env=env)
    run_train([*args, "--init_from=resume", "--out_dir=sft", "--max_iters=4"], workdir, env=env)
    run_train([*args, "--init_from=sft", "--out_dir=tuned", "--max_iters=2"], workdir, env=env)
    hf_tok = transformers.AutoTokenizer.from_pretrained(workdir / "hf")
    for out in ("sft", "tuned"):
        spec = torch.load(workdir / out / "ckpt.pt", weights_only=True)["tokenizer"]
        assert spec == {"tokenizer": f"hf:{workdir / 'hf'}"}, (out, spec)
        tokenizer = convert.load_run(out)[1]
        assert tokenizer.encode("Say maybe.") == hf_tok.encode("Say maybe.", add_special_tokens=False)
    os.makedirs("elsewhere")
    proc = run_script("sample.py", [f"--out_dir={workdir / 'tuned'}", "--start=ROMEO:", "--num_samples=1",
                                    "--max_new_tokens=12", "--temperature=0", "--device=cpu"], workdir / "elsewhere",
                      check=False)
    assert proc.returncode == 0, proc.stderr
    tuned = convert.load_run("tuned")[0]
    ids = tuned.generate(torch.tensor([hf_tok.encode("ROMEO:", add_special_tokens=False)]), 12, temperature=0)
    assert proc.stdout.startswith(hf_tok.decode(ids[0].tolist()) + "\n")


@pytest.mark.slow
def test_transformers_and_lm_eval_import_from_the_repository_root_beside_our_modules():
    """Run from the repository root, as every command here is, our modules must not hide a package transformers or
    lm-eval imports (a kernels/ folder hid the PyPI package `kernels`, which transformers 5.25 imports). CI runs
    this with the newest releases."""
    code = ("import model, moe, gemm_kernels, data, convert, evaluation\n"
            "import transformers, lm_eval\n"
            "from transformers import AutoModelForCausalLM, LlamaForCausalLM, MixtralForCausalLM\n"
            "from lm_eval.models.huggingface import HFLM\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_an_exported_folder_is_readable_like_any_other(workdir):
    """N6: the export is written in a private temporary folder and renamed; the folder and its files then get the
    modes the umask gives any new file, not the temporary folder's 0700."""
    make_run("run")
    umask = os.umask(0o022)
    try:
        convert.export_hf("run", "hf")
    finally:
        os.umask(umask)
    assert os.stat("hf").st_mode & 0o777 == 0o755
    assert {os.stat(os.path.join("hf", f)).st_mode & 0o777 for f in os.listdir("hf")} == {0o644}
