"""
Models in and out: load_run, the one way every script loads a model (a run, a Hugging Face folder or GPT-2, with
its tokenizer and settings); a run exported to a Hugging Face folder; and the command line for both and for the
evaluations (evaluation.py):

    python convert.py RUN_DIR HF_DIR [--force]   # a run (ckpt.pt or ckpt_dcp/) -> a Hugging Face folder
    python convert.py RUN_DIR --ckpt             # a distributed checkpoint -> RUN_DIR/ckpt.pt (one file to copy)
    python convert.py eval SOURCE [--bpb DATA_DIR] [--choices FILE.jsonl]   # SOURCE: a run directory or hf:FOLDER

Export and import are renames, because nanothink's layouts are those of four Hugging Face classes: 'modern' is
LlamaForCausalLM (same rotary convention, so no q/k permutation), with qk_norm Qwen3ForCausalLM, with experts
MixtralForCausalLM, and 'gpt2' is GPT2LMHeadModel. An option none of them has is refused, by name. config.json
states every value whose Hugging Face default differs from ours. transformers, safetensors and tokenizers are
imported only where used. from_hf (load_run's 'hf:FOLDER') is the way back in.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

import data
import evaluation
from checkpoint import dcp_to_ckpt, load_weights, read_run
from model import GPT, GPTConfig

ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM", "MixtralForCausalLM", "GPT2LMHeadModel")


def need(package, why):
    """Imports an optional package, or raises ImportError with the pip command (commands turn it into error:)."""
    try:
        return __import__(package)
    except ImportError:
        raise ImportError(f"{why} needs the '{package}' package: pip install {package}") from None


# -----------------------------------------------------------------------------
# loading a model: the one way every script does it


def load_run(source, device="cpu", **settings):
    """(model, tokenizer, run settings) of `source`: a run's out_dir (the later of its ckpt.pt and ckpt_dcp/),
    'hf:FOLDER' (a local Hugging Face folder) or a GPT-2 name. The model is built on `device`, in eval mode, with
    no dropout or gradient checkpointing unless `settings` (GPTConfig fields a run may change) say otherwise. The
    run settings are the train.py config a run saved ({} for the others). FileNotFoundError when there is nothing
    to load, CheckpointError (a ValueError) when it cannot be read."""
    source, settings = str(source), {"dropout": 0.0, "grad_checkpoint": False, **settings}
    if source.startswith(("hf:", "gpt2")):
        model = from_hf(source[3:], settings["dropout"]) if source.startswith("hf:") else \
            from_gpt2(source, settings["dropout"])
        model.config.grad_checkpoint = settings["grad_checkpoint"]
        spec, run = {"tokenizer": source if source.startswith("hf:") else "gpt2"}, {}
    else:
        ckpt = read_run(source)
        with torch.device(device):  # built where it runs: on a GPU node no rank holds the weights in host memory
            model = GPT(GPTConfig(**{**ckpt["model_args"], **settings}))
        load_weights(model, ckpt["model"], source)
        spec, run = ckpt.get("tokenizer") or old_run_tokenizer(ckpt["config"], model.config.vocab_size), ckpt["config"]
    return model.eval().to(device), data.Tokenizer(spec), run


def old_run_tokenizer(run_config, vocab_size):
    """The tokenizer of a run saved before checkpoints kept theirs: the HF folder it started from, else its
    dataset's meta.json (found from the current directory, as train.py found it), else GPT-2's BPE."""
    if str(run_config.get("init_from", "")).startswith("hf:"):
        return {"tokenizer": run_config["init_from"]}
    path = os.path.join("data", run_config.get("dataset", ""))
    meta = data.read_meta(path)
    if not meta and vocab_size < 50257:
        raise FileNotFoundError(f"{path}/meta.json not found, and a vocabulary of {vocab_size} is not GPT-2's: run "
                                f"from the directory that holds {path}")
    return meta or {"tokenizer": "gpt2"}


# -----------------------------------------------------------------------------
# export


def hf_config(c, n_vocab):
    """(architecture, config.json dict) for a GPTConfig and the number of real tokens; ValueError naming the
    first option no Hugging Face class has."""
    refuse = [("dre", c.dre, "the Dynamic Reasoning Engine has no Hugging Face equivalent")]
    if c.n_expert:
        refuse += [("n_shared_expert", c.n_shared_expert, "Mixtral has no shared experts"),
                   ("router_score", c.router_score != "softmax", "Mixtral's router is a softmax"),
                   ("router_renormalize", not c.router_renormalize, "Mixtral renormalises the top_k weights"),
                   ("moe_balance", c.moe_balance == "bias", "Mixtral has no expert bias in its routing"),
                   ("top_k", c.top_k == 1, "Mixtral weighs a token's one expert by 1, nanothink by its router "
                                           "probability (as Switch does, so that the router learns)"),
                   ("capacity_factor", c.capacity_factor > 0, "Mixtral is dropless"),
                   ("moe_every", c.moe_every != 1, "every Mixtral layer is MoE"),
                   ("qk_norm", c.qk_norm, "Mixtral has no QK-norm"),
                   ("bias", c.bias, "Mixtral has no biases")]
    if c.layout == "gpt2":
        refuse += [("n_kv_head", c.n_kv_head != c.n_head, "GPT-2 has no grouped-query attention"),
                   ("qk_norm", c.qk_norm, "GPT-2 has no QK-norm")]
    elif c.qk_norm:
        refuse += [("bias", c.bias, "Qwen3's MLP has no biases")]
    for name, bad, why in refuse:
        if bad:
            raise ValueError(f"{name}={getattr(c, name)!r} cannot be exported: {why}; a run trained with "
                             f"--{name}={GPTConfig.defaults()[name]} can be")
    common = {"vocab_size": n_vocab, "tie_word_embeddings": c.tie_embeddings, "dtype": "float32",
              "torch_dtype": "float32"}
    if c.layout == "gpt2":
        return "GPT2LMHeadModel", {
            **common, "model_type": "gpt2", "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd,
            "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": c.mlp_hidden, "activation_function": "gelu_new",
            "layer_norm_epsilon": c.norm_eps, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}
    arch = "MixtralForCausalLM" if c.n_expert else "Qwen3ForCausalLM" if c.qk_norm else "LlamaForCausalLM"
    out = {**common, "model_type": arch[:-len("ForCausalLM")].lower(), "hidden_size": c.n_embd,
           "intermediate_size": c.expert_hidden if c.n_expert else c.mlp_hidden, "num_hidden_layers": c.n_layer,
           "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.n_embd // c.n_head,
           "hidden_act": "silu", "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
           # both spellings: transformers >= 5 reads rope_parameters, older releases (and vLLM) the top-level key
           "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
           "attention_bias": c.bias, "attention_dropout": c.dropout}
    if arch == "LlamaForCausalLM":
        out["mlp_bias"] = c.bias
    elif arch == "Qwen3ForCausalLM":
        out.update(use_sliding_window=False, sliding_window=None)
    else:
        out.update(num_local_experts=c.n_expert, num_experts_per_tok=c.top_k, sliding_window=None,
                   router_aux_loss_coef=c.aux_loss_coef, router_jitter_noise=0.0, output_router_logits=False)
    return arch, out


# nanothink name -> Hugging Face name inside a layer, for the Llama family
LLAMA_NAMES = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
               "attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
               "attn.c_proj": "self_attn.o_proj", "attn.q_norm.weight": "self_attn.q_norm.weight",
               "attn.k_norm.weight": "self_attn.k_norm.weight", "mlp.c_gate": "mlp.gate_proj",
               "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj",
               "mlp.router.weight": "block_sparse_moe.gate.weight"}
GPT2_PARTS = ("ln_1", "ln_2", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # same names, Conv1D weights (in, out)


def llama_name(name):
    """transformer.h.{i}.{ours}{suffix} -> model.layers.{i}.{LLAMA_NAMES[ours]}{suffix}."""
    i, rest = name[len("transformer.h."):].split(".", 1)
    ours = next(k for k in LLAMA_NAMES if rest == k or rest.startswith(k + "."))
    return f"model.layers.{i}.{LLAMA_NAMES[ours]}{rest[len(ours):]}"


def to_hf_weights(config, weights, n_vocab):
    """Hugging Face weight names -> tensors (hub layout: Mixtral's experts one by one, GPT-2's Conv1D (in, out)
    and fused c_attn). Rows of the vocabulary past n_vocab (padding for fast matmuls) are left out."""
    w = {k: v.float() for k, v in weights.items() if not k.endswith("expert_bias")}
    out = {}
    if config.layout == "gpt2":
        out["transformer.wte.weight"] = w.pop("transformer.wte.weight")[:n_vocab]
        out["transformer.wpe.weight"] = w.pop("transformer.wpe.weight")
        out["transformer.ln_f.weight"] = w.pop("transformer.ln_f.weight")
        out["transformer.ln_f.bias"] = w.pop("transformer.ln_f.bias", torch.zeros(config.n_embd))
        for i in range(config.n_layer):
            h = f"transformer.h.{i}."
            qkv = [w.pop(f"{h}attn.c_{n}.weight") for n in "qkv"]
            out[f"{h}attn.c_attn.weight"] = torch.cat(qkv).t()
            out[f"{h}attn.c_attn.bias"] = torch.cat([w.pop(f"{h}attn.c_{n}.bias", torch.zeros(config.n_embd))
                                                     for n in "qkv"])
            for ours, width in (("ln_1", config.n_embd), ("ln_2", config.n_embd), ("attn.c_proj", config.n_embd),
                                ("mlp.c_fc", config.mlp_hidden), ("mlp.c_proj", config.n_embd)):
                weight = w.pop(f"{h}{ours}.weight")
                out[f"{h}{ours}.weight"] = weight.t() if weight.dim() == 2 else weight  # Conv1D is (in, out)
                out[f"{h}{ours}.bias"] = w.pop(f"{h}{ours}.bias", torch.zeros(width))  # GPT-2 always has biases
    else:
        out["model.embed_tokens.weight"] = w.pop("transformer.wte.weight")[:n_vocab]
        out["model.norm.weight"] = w.pop("transformer.ln_f.weight")
        experts = ("mlp.w13", "mlp.w2", "mlp.w1", "mlp.w3")  # (runs saved before w13 hold w1 and w3)
        for name in [k for k in w if k.startswith("transformer.h.") and k.endswith(experts)]:
            i, weights = name.split(".")[2], w.pop(name)  # (E, out, in), as nn.Linear; w13: (E, 2, out, in)
            kinds = {"w1": weights[:, 0], "w3": weights[:, 1]} if name.endswith("w13") else {name[-2:]: weights}
            for kind, stacked in kinds.items():
                for e, expert in enumerate(stacked):
                    out[f"model.layers.{i}.block_sparse_moe.experts.{e}.{kind}.weight"] = expert
        for name in [k for k in w if k.startswith("transformer.h.")]:
            out[llama_name(name)] = w.pop(name)
    head = w.pop("lm_head.weight")
    if not config.tie_embeddings:
        out["lm_head.weight"] = head[:n_vocab]
    if w:
        raise ValueError(f"weights with no Hugging Face name: {', '.join(sorted(w))}")
    return {k: v.contiguous() for k, v in out.items()}


def bpe_merges(ranks):
    """The merge list of a tiktoken encoding, whose files hold only ranks: a token's merge is the pair that
    byte-pair encoding of its bytes, using only the lower-ranked tokens, ends with."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pair = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], math.inf))
            parts[pair:pair + 2] = [parts[pair] + parts[pair + 1]]
        if len(parts) == 2:
            merges.append(tuple(parts))
    return merges


def build_tokenizer(meta):
    """(tokenizers.Tokenizer, special tokens {name: text}) for a meta.json's 'char', 'bpe' or tiktoken tokenizer."""
    tokenizers = need("tokenizers", "writing the tokenizer files")
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    if meta.get("tokenizer", "gpt2") == "char":
        # a BPE with no merges splits text into characters; Fuse joins them back without spaces
        tok = tokenizers.Tokenizer(models.BPE({ch: i for i, ch in enumerate(meta["chars"])}, []))
        tok.decoder = decoders.Fuse()
        return tok, {}
    need("tiktoken", "writing a BPE tokenizer")
    enc = data.Tokenizer(meta).backend  # a tiktoken Encoding, named or trained (data.train_bpe)
    ranks = enc._mergeable_ranks  # tiktoken's bytes -> rank table (no public accessor)
    byte_char = data.bytes_to_unicode()
    text = lambda b: "".join(byte_char[x] for x in b)  # noqa: E731
    tok = tokenizers.Tokenizer(models.BPE({text(t): r for t, r in ranks.items()},
                                          [(text(a), text(b)) for a, b in bpe_merges(ranks)]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in specials])
    eot = specials[0][0] if specials else None
    return tok, ({"bos_token": eot, "eos_token": eot, "unk_token": eot} if eot else {})


def write_tokenizer(meta, hf_dir):
    """Tokenizer files AutoTokenizer loads; returns the special token ids for config.json, None where there is
    none (stated, since a missing one means Llama's defaults, 1 and 2: "!" would end every generation)."""
    if meta.get("tokenizer", "gpt2").startswith("hf:"):  # a run fine-tuned from an HF folder keeps its tokenizer
        tok = hf_tokenizer(meta["tokenizer"][3:])
        tok.save_pretrained(hf_dir)
        return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    tok, specials = build_tokenizer(meta)
    tok.save(os.path.join(hf_dir, "tokenizer.json"))
    with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
                   "clean_up_tokenization_spaces": False, "model_max_length": 10**9, **specials}, f, indent=2)
    with open(os.path.join(hf_dir, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    return {f"{k}_token_id": tok.token_to_id(specials[f"{k}_token"]) if specials else None for k in ("bos", "eos")}


def export_hf(run_dir, hf_dir, force=False):
    """A run -> a Hugging Face folder: model.safetensors, config.json, generation_config.json, tokenizer files.
    Written to a temporary folder beside hf_dir, then renamed: a failure leaves no half folder."""
    need("safetensors", "exporting to Hugging Face")
    from safetensors.torch import save_file
    if os.path.exists(hf_dir) and not force:
        raise FileExistsError(f"{hf_dir} already exists; pass --force to replace it")
    run = read_run(run_dir)
    config = GPTConfig(**{**run["model_args"], "dropout": 0.0})
    meta = run.get("tokenizer") or old_run_tokenizer(run["config"], config.vocab_size)
    n_vocab = min(config.vocab_size, data.Tokenizer(meta).vocab_size)  # padded rows are not tokens
    arch, hf = hf_config(config, n_vocab)
    tensors = to_hf_weights(config, run["model"], n_vocab)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(hf_dir)) + ".", dir=os.path.dirname(
        os.path.abspath(hf_dir)))
    try:
        ids = write_tokenizer(meta, tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"architectures": [arch], **hf, **ids, "nanothink_iter": run["iter_num"]}, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:  # sample.py's defaults
            json.dump({**ids, "do_sample": True, "temperature": 0.8, "top_k": 200},
                      f, indent=2)
        umask = os.umask(0)
        os.umask(umask)  # (read it: there is no other way) the folder is made private; give it the usual modes
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if os.path.exists(hf_dir):
            shutil.rmtree(hf_dir)
        os.replace(tmp, hf_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return arch


# -----------------------------------------------------------------------------
# import


def hf_tokenizer(path):
    transformers = need("transformers", "a Hugging Face tokenizer")
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def read_hf_weights(path):
    """name -> tensor from a folder's safetensors (one file or an index of shards), else pytorch_model.bin."""
    index = os.path.join(path, "model.safetensors.index.json")
    files = [os.path.join(path, "model.safetensors")]
    if os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    if os.path.exists(files[0]):
        need("safetensors", "reading Hugging Face weights")
        from safetensors.torch import load_file
        return {k: v for file in files for k, v in load_file(file).items()}
    if os.path.exists(os.path.join(path, "pytorch_model.bin")):
        return torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def config_from_hf(hf, dropout=0.0):
    """GPTConfig from a config.json dict of the four classes; ValueError naming what nanothink lacks."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch} cannot be imported; nanothink reads {', '.join(ARCHITECTURES)}")
    if arch == "GPT2LMHeadModel":
        for key, want in (("activation_function", "gelu_new"), ("scale_attn_by_inverse_layer_idx", False)):
            if hf.get(key, want) != want:
                raise ValueError(f"{key}={hf[key]!r} cannot be imported: nanothink's gpt2 layout has {want!r}")
        return GPTConfig(layout="gpt2", block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                         n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                         mlp_hidden=hf.get("n_inner") or 4 * hf["n_embd"], bias=True, dropout=dropout,
                         norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=hf.get("tie_word_embeddings", True))
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    checks = [("hidden_act", hf.get("hidden_act", "silu") != "silu", "SwiGLU uses silu"),
              ("rope_type", rope.get("rope_type", rope.get("type", "default")) != "default",
               "nanothink's rotary embedding has no scaling"),
              ("head_dim", head_dim * hf["num_attention_heads"] != hf["hidden_size"],
               "nanothink's heads are hidden_size / num_attention_heads wide"),
              ("mlp_bias", hf.get("mlp_bias", False) != hf.get("attention_bias", False),
               "nanothink has one bias setting for attention and MLP"),
              ("use_sliding_window", hf.get("use_sliding_window", False), "nanothink attends to the whole window"),
              ("sliding_window", arch == "MixtralForCausalLM" and hf.get("sliding_window") not in (None, 0)
               and hf["sliding_window"] < hf["max_position_embeddings"], "nanothink attends to the whole window")]
    for key, bad, why in checks:
        if bad:
            raise ValueError(f"{key}={hf.get(key, rope.get(key))!r} cannot be imported: {why}")
    moe = arch == "MixtralForCausalLM"
    return GPTConfig(layout="modern", block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                     n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                     n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], n_embd=hf["hidden_size"],
                     mlp_hidden=hf["intermediate_size"], bias=hf.get("attention_bias", False),
                     qk_norm=arch == "Qwen3ForCausalLM", tie_embeddings=hf.get("tie_word_embeddings", False),
                     rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                     norm_eps=hf.get("rms_norm_eps", 1e-6), dropout=dropout,
                     n_expert=hf["num_local_experts"] if moe else 0, top_k=hf.get("num_experts_per_tok", 2))


def from_hf(path, dropout=0.0):
    """A GPT with the weights of a local Hugging Face folder of the four classes (no network)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    with open(os.path.join(path, "config.json")) as f:
        return from_hf_weights(json.load(f), read_hf_weights(path), dropout, path)


def from_gpt2(name, dropout=0.0):
    """OpenAI's GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'): from the Hugging Face cache, else downloaded
    by transformers; offline and not cached, a ValueError at once saying what to do, rather than a minute of retries."""
    if name not in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        raise ValueError(f"unknown GPT-2 model {name!r}")
    gpt2 = need("transformers", "loading GPT-2 weights (not in requirements.txt)").GPT2LMHeadModel
    try:
        return from_hf_model(gpt2.from_pretrained(name, local_files_only=True), dropout)
    except OSError:  # not cached
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        raise ValueError(f"{name}'s weights are not in the Hugging Face cache and the Hub cannot be reached: "
                         f"download them where there is a network (python -c \"from transformers import "
                         f"GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('{name}')\") and copy "
                         f"~/.cache/huggingface here, or give a local folder: init_from=hf:FOLDER")
    return from_hf_model(gpt2.from_pretrained(name), dropout)


def hub_reachable(timeout=3.0):
    """Whether the Hugging Face Hub answers a TCP connection within timeout seconds (HF_ENDPOINT's host if set)."""
    import socket
    from urllib.parse import urlsplit
    host = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_hf_model(hf, dropout=0.0):
    """A GPT from a transformers model of the four classes, in memory."""
    config = {**hf.config.to_dict(), "architectures": [type(hf).__name__]}
    return from_hf_weights(config, dict(hf.state_dict()), dropout, type(hf).__name__)


def from_hf_weights(hf_config, w, dropout=0.0, source="the weights"):
    """A GPT from a config.json dict and its name -> tensor weights (which it empties)."""
    config = config_from_hf(hf_config, dropout)
    sd = {}
    if config.layout == "gpt2":
        w = {k.removeprefix("transformer."): v for k, v in w.items() if not k.endswith((".attn.bias", "masked_bias"))}
        sd["transformer.wte.weight"], sd["transformer.wpe.weight"] = w.pop("wte.weight"), w.pop("wpe.weight")
        sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = w.pop("ln_f.weight"), w.pop("ln_f.bias")
        for i in range(config.n_layer):
            for p in ("weight", "bias"):
                qkv = w.pop(f"h.{i}.attn.c_attn.{p}")
                for n, piece in zip("qkv", (qkv.t() if p == "weight" else qkv).chunk(3)):
                    sd[f"transformer.h.{i}.attn.c_{n}.{p}"] = piece
                for name in GPT2_PARTS:
                    t = w.pop(f"h.{i}.{name}.{p}")
                    sd[f"transformer.h.{i}.{name}.{p}"] = t.t() if t.dim() == 2 else t
    else:
        sd["transformer.wte.weight"], sd["transformer.ln_f.weight"] = w.pop("model.embed_tokens.weight"), \
            w.pop("model.norm.weight")
        theirs = {v: k for k, v in LLAMA_NAMES.items()}
        for name in [k for k in w if k.startswith("model.layers.")]:
            i, rest = name[len("model.layers."):].split(".", 1)
            if ".experts." in rest:
                continue
            key = next((t for t in theirs if rest == t or rest.startswith(t + ".")), None)
            if key is None and rest.endswith("rotary_emb.inv_freq"):  # older Llama files: a table we compute
                w.pop(name)
                continue
            if key is None:
                raise ValueError(f"{source} has a weight nanothink has no place for: {name}")
            sd[f"transformer.h.{i}.{theirs[key]}{rest[len(key):]}"] = w.pop(name)
        for i in range(config.n_layer if config.n_expert else 0):
            kind = {k: torch.stack([w.pop(f"model.layers.{i}.block_sparse_moe.experts.{e}.{k}.weight")
                                    for e in range(config.n_expert)]) for k in ("w1", "w2", "w3")}
            sd[f"transformer.h.{i}.mlp.w13"] = torch.stack([kind["w1"], kind["w3"]], 1)  # gate and up: one weight
            sd[f"transformer.h.{i}.mlp.w2"] = kind["w2"]
    head = w.pop("lm_head.weight", None)
    sd["lm_head.weight"] = sd["transformer.wte.weight"] if config.tie_embeddings or head is None else head
    if w:
        raise ValueError(f"{source}: weights nanothink has no place for: {', '.join(sorted(w)[:5])}")
    model = GPT(config)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model


def evaluate(argv):
    p = argparse.ArgumentParser(prog="convert.py eval", description="bits per byte and multiple-choice accuracy")
    p.add_argument("source", help="a run directory, or hf:FOLDER")
    p.add_argument("--bpb", metavar="DATA_DIR", help="a prepared dataset folder: bits per byte on its val.bin")
    p.add_argument("--choices", metavar="JSONL", help="HellaSwag-format items: accuracy")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if not (a.bpb or a.choices):
        raise ValueError("nothing to evaluate: give --bpb DATA_DIR and/or --choices FILE.jsonl")
    model, tokenizer, _ = load_run(a.source, a.device)
    if a.bpb:
        val = data.token_files(a.bpb, "val")[0]
        if not os.path.exists(val):
            raise FileNotFoundError(f"{val} not found; --bpb takes a folder prepared by data/*/prepare.py")
        ids = np.fromfile(val, dtype=data.read_meta(a.bpb).get("dtype", "uint16"))
        print(f"val bits per byte: {evaluation.bits_per_byte(model, tokenizer, ids, device=a.device):.4f} "
              f"({len(ids):,} tokens, {evaluation.bytes_per_token(tokenizer, ids):.3f} bytes per token)")
    if a.choices:
        items = evaluation.read_choices(a.choices)
        acc = evaluation.choice_accuracy(model, tokenizer, items, a.device)
        print(f"{len(items)} items: acc_token {acc['acc_token']:.4f} (mean log-likelihood per token), acc "
              f"{acc['acc']:.4f} (sum), acc_norm {acc['acc_norm']:.4f} (per character)")


def main(argv):
    if argv[:1] == ["eval"]:
        return evaluate(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("hf_dir", nargs="?", help="the Hugging Face folder to write")
    p.add_argument("--force", action="store_true", help="replace hf_dir if it exists")
    p.add_argument("--ckpt", action="store_true", help="write run_dir/ckpt.pt from its distributed checkpoint")
    a = p.parse_args(argv)
    if a.ckpt == bool(a.hf_dir):
        raise ValueError("give either HF_DIR (export to Hugging Face) or --ckpt (distributed checkpoint -> ckpt.pt)")
    if a.ckpt:
        print(f"wrote {dcp_to_ckpt(a.run_dir)}")
    else:
        print(f"wrote {a.hf_dir} ({export_hf(a.run_dir, a.hf_dir, a.force)})")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        sys.exit(f"error: {e}")
