"""model.py: attention is causal, the KV cache changes nothing, GPT-2 weights reproduce Hugging Face's logits,
the optimizers see the right parameters, and Muon is the published algorithm."""

import copy
import math

import pytest
import torch

import convert
import muon as muon_py
from model import GPT, GPTConfig, KVCache, sample_next
from muon import Muon

VOCAB, BLOCK = 50, 16


def tiny(**overrides):
    kwargs = dict(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    kwargs.update(overrides)
    return GPTConfig(**kwargs)


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(tiny(**overrides))
    # GPT's init (std 0.02, zero biases, unit gains) leaves a tiny random model nearly blind to its context: each
    # position's output is mostly its own token, and its next-token distribution is almost uniform. Unit-gain
    # matrices and random gains and biases make earlier tokens and every parameter matter, so a broken mask, cache,
    # position offset or weight mapping shows, and sampling has a distribution worth truncating.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.size(1)))
            else:
                p.add_(0.1 * torch.randn_like(p))
        model.lm_head.weight.mul_(2.0)
    return model.eval()


LAYOUTS = {
    "modern": dict(layout="modern"),
    "gpt2": dict(layout="gpt2", bias=True),
    "modern_gqa_qknorm_untied": dict(layout="modern", n_kv_head=2, qk_norm=True, tie_embeddings=False),
}


def tokens(B, T, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("layout", LAYOUTS)
def test_changing_a_future_token_leaves_earlier_logits_unchanged(layout):
    model = make_model(**LAYOUTS[layout])
    idx = tokens(2, BLOCK)
    changed = idx.clone()
    p = 9
    changed[:, p] = (idx[:, p] + 1) % VOCAB
    changed[:, p + 3] = (idx[:, p + 3] + 7) % VOCAB
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    torch.testing.assert_close(after[:, :p], before[:, :p], rtol=0, atol=1e-6)
    # the changed position and everything after it do see the change (so the comparison above is not vacuous)
    assert (after[:, p:] - before[:, p:]).abs().amax(dim=-1).min() > 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kv_cache_one_token_at_a_time_equals_full_forward(layout):
    model = make_model(**LAYOUTS[layout])
    idx = tokens(2, BLOCK)
    with torch.no_grad():
        full = model.hidden(idx)
        caches = [KVCache(BLOCK) for _ in model.transformer.h]
        steps = [model.hidden(idx[:, t:t + 1], caches) for t in range(BLOCK)]
    assert caches[0].pos == BLOCK
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kv_cache_chunked_prefill_equals_full_forward(layout):
    # a chunk of several tokens after cached ones needs the explicit offset causal mask
    model = make_model(**LAYOUTS[layout])
    idx = tokens(2, 12)
    with torch.no_grad():
        full = model.hidden(idx)
        caches = [KVCache(BLOCK) for _ in model.transformer.h]
        chunks, start = [], 0
        for size in (5, 3, 1, 3):
            chunks.append(model.hidden(idx[:, start:start + size], caches))
            start += size
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-5)


def test_feeding_more_than_block_size_tokens_is_an_error():
    model = make_model()
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(1, BLOCK + 1))
    caches = [KVCache(BLOCK) for _ in model.transformer.h]
    model.hidden(tokens(1, BLOCK - 2), caches)
    with pytest.raises(ValueError, match="block_size"):
        model.hidden(tokens(1, 3), caches)


# ---------------------------------------------------------------------------------------------------------------------
# generation and sampling


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sampling", [dict(temperature=1.0, top_k=10, top_p=0.9), dict(temperature=0.0)],
                         ids=["sampled", "greedy"])
def test_kv_cache_generation_equals_full_recompute(layout, sampling):
    model = make_model(**LAYOUTS[layout])
    prompt = tokens(3, 4)
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        outputs.append(model.generate(prompt, BLOCK - 4 + 1, use_cache=use_cache, **sampling))
    assert outputs[0].shape == (3, BLOCK + 1)
    assert torch.equal(outputs[0][:, :4], prompt)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_continues_beyond_block_size(use_cache):
    model = make_model()
    prompt = tokens(2, 5)
    out = model.generate(prompt, 3 * BLOCK, temperature=1.0, top_k=5, use_cache=use_cache)
    assert out.shape == (2, 5 + 3 * BLOCK)
    assert torch.equal(out[:, :5], prompt)
    assert out.min() >= 0 and out.max() < VOCAB


def test_greedy_generation_with_and_without_cache_agree_until_the_cache_restarts():
    # with the cache, the context restarts from the newest block_size/2 tokens once the window is full;
    # until then, both paths see exactly the same tokens
    model = make_model()
    prompt = tokens(2, 5)
    cached = model.generate(prompt, 2 * BLOCK, temperature=0.0, use_cache=True)
    recomputed = model.generate(prompt, 2 * BLOCK, temperature=0.0, use_cache=False)
    assert torch.equal(cached[:, :BLOCK + 1], recomputed[:, :BLOCK + 1])


def test_sample_next_with_temperature_zero_or_top_k_one_is_argmax():
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(dim=-1, keepdim=True)
    assert torch.equal(sample_next(logits, temperature=0.0), argmax)
    torch.manual_seed(0)
    for _ in range(5):
        assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), argmax)
        assert torch.equal(sample_next(logits, temperature=5.0, top_k=1, top_p=0.99), argmax)


def crafted_logits(n):
    # ids 0..5 with probabilities 0.05, 0.30, 0.02, 0.50, 0.10, 0.03: not sorted, so the nucleus must be mapped back
    probs = torch.tensor([0.05, 0.30, 0.02, 0.50, 0.10, 0.03])
    return probs.log().expand(n, -1).contiguous()


def test_top_p_never_samples_outside_the_nucleus_and_renormalises_inside_it():
    logits = crafted_logits(20000)
    torch.manual_seed(0)
    # top_p=0.75: 0.50 (id 3) alone falls short, 0.50 + 0.30 (id 1) reaches it, so the nucleus is {3, 1}
    counts = torch.bincount(sample_next(logits, top_p=0.75).flatten(), minlength=6).double()
    assert set(counts.nonzero().flatten().tolist()) == {1, 3}
    assert abs(counts[3] / counts.sum() - 0.5 / 0.8) < 0.02
    # top_p=0.85 adds the next most likely token (id 4)
    counts = torch.bincount(sample_next(logits, top_p=0.85).flatten(), minlength=6)
    assert set(counts.nonzero().flatten().tolist()) == {1, 3, 4}
    # top_p below the most likely token's probability still keeps that token
    assert torch.equal(sample_next(logits[:100], top_p=0.1), torch.full((100, 1), 3))


def test_top_k_never_samples_outside_the_k_most_likely():
    logits = crafted_logits(20000)
    torch.manual_seed(0)
    counts = torch.bincount(sample_next(logits, top_k=3).flatten(), minlength=6).double()
    assert set(counts.nonzero().flatten().tolist()) == {1, 3, 4}
    assert abs(counts[3] / counts.sum() - 0.5 / 0.9) < 0.02
    # without truncation every token is reachable
    counts = torch.bincount(sample_next(logits).flatten(), minlength=6)
    assert (counts > 0).all()


def test_temperature_samples_in_proportion_to_p_to_the_one_over_t():
    logits, p = crafted_logits(20000), torch.tensor([0.05, 0.30, 0.02, 0.50, 0.10, 0.03], dtype=torch.float64)
    torch.manual_seed(0)
    for t in (2.0, 0.5):  # softmax(log p / t) = p^(1/t), renormalised
        counts = torch.bincount(sample_next(logits, temperature=t).flatten(), minlength=6).double()
        want = p ** (1 / t) / (p ** (1 / t)).sum()
        assert (counts / counts.sum() - want).abs().max() < 0.02, (t, counts / counts.sum(), want)


# ---------------------------------------------------------------------------------------------------------------------
# GPT-2 weights


def test_gpt2_layout_reproduces_hugging_face_gpt2_logits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=100,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                        bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    assert hf_config.activation_function == "gelu_new"  # the tanh approximation our gpt2 layout uses
    with torch.no_grad():  # non-trivial norms and biases, so that a mis-mapped or transposed one shows, and
        for p in hf.parameters():  # pre-activations large enough that exact GELU would miss by ~8e-4
            p.add_(0.1 * torch.randn_like(p))
    model = convert.from_hf_model(hf).eval()
    assert model.config.layout == "gpt2" and model.config.block_size == 32
    idx = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# optimizers


def ids(params):
    return sorted(id(p) for p in params)


@pytest.mark.parametrize("layout", ["modern_gqa_qknorm_untied", "gpt2"])
def test_adamw_decays_exactly_the_matrices_and_embeddings(layout):
    model = make_model(**LAYOUTS[layout])
    [opt] = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    params = list(model.parameters())  # shared (tied) parameters appear once
    assert ids(decay["params"]) == ids(p for p in params if p.dim() >= 2)
    assert ids(no_decay["params"]) == ids(p for p in params if p.dim() == 1)


@pytest.mark.parametrize("layout", ["modern_gqa_qknorm_untied", "gpt2"])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(layout):
    model = make_model(**LAYOUTS[layout])
    muon, adamw = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95),
                                             device_type="cpu", optimizer="muon")
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    assert muon.defaults["adjust_lr_fn"] == "match_rms_adamw"  # one learning_rate serves both optimizers
    named = dict(model.named_parameters())
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = [id(p) for g in adamw.param_groups for p in g["params"]]
    expected_muon = {id(p) for n, p in named.items() if n.startswith("transformer.h.") and p.dim() == 2}
    assert in_muon == expected_muon
    assert len(expected_muon) == model.config.n_layer * (7 if model.config.layout == "modern" else 6)
    assert not in_muon & set(in_adamw)
    assert sorted(in_adamw) == sorted(id(p) for p in named.values() if id(p) not in in_muon)  # each once
    t = model.transformer
    for p in [t.wte.weight, model.lm_head.weight, t.ln_f.weight, t.h[0].ln_1.weight, t.h[1].ln_2.weight]:
        assert id(p) in in_adamw
    if model.config.layout == "gpt2":
        assert id(named["transformer.wpe.weight"]) in in_adamw
        assert id(named["transformer.h.0.attn.c_q.bias"]) in in_adamw
    else:
        assert id(named["transformer.h.0.attn.q_norm.weight"]) in in_adamw
    decay, no_decay = adamw.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


# Muon as published (Keller Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024; the lr matching
# of Liu et al., "Muon is Scalable for LLM Training", 2025), written out in float64. Like the reference
# implementation, torch runs Newton-Schulz in bfloat16; `precision` rounds each intermediate result to it.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(G, precision=torch.bfloat16, eps=1e-7):
    a, b, c = NS_COEFFICIENTS
    r = lambda t: t.to(precision).double()  # noqa: E731
    X = r(G.double())
    tall = X.size(0) > X.size(1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.T
    X = r(X / r(X.norm().clamp(min=eps)))  # Frobenius norm >= spectral norm: singular values start in [0, 1]
    for _ in range(5):
        A = r(X @ X.T)
        B = r(b * A + c * A @ A)
        X = r(a * X + B @ X)
    return X.T if tall else X


def reference_muon(W, grads, lr, weight_decay, momentum, nesterov):
    """The weights after each step. The momentum buffer is an exponential average, b = mu*b + (1-mu)*g, and the
    Nesterov look-ahead (1-mu)*g + mu*b; the sum form (b = mu*b + g, u = g + mu*b) is the same up to the factor
    (1-mu), which the normalisation inside Newton-Schulz removes."""
    W, buf, out = W.double().clone(), torch.zeros_like(W, dtype=torch.float64), []
    rows, cols = W.shape
    adjusted_lr = lr * 0.2 * math.sqrt(max(rows, cols))  # "match_rms_adamw": update RMS ~ AdamW's ~0.2
    for g in grads:
        g = g.double()
        buf = momentum * buf + (1 - momentum) * g
        update = (1 - momentum) * g + momentum * buf if nesterov else buf
        W = W * (1 - lr * weight_decay)  # decoupled decay, with the unadjusted lr, before the update
        W = W - adjusted_lr * newton_schulz5(update)
        out.append(W)
    return out


def assert_steps_match(W0, got, want, rel=2e-3):
    # relative to the size of each step. On this machine the match is exact (the same bf16 roundings); the
    # tolerance leaves room for a few roundings that fall the other way where a CPU accumulates in another order.
    # A wrong lr scale, momentum, decay order or NS coefficient is off by >= 1%.
    prev = W0.double()
    for step, (g, w) in enumerate(zip(got, want)):
        err = ((g - w).norm() / (w - prev).norm()).item()
        assert err < rel, f"step {step}: relative error {err:.2e}"
        prev = w


@pytest.mark.parametrize("name", ["transformer.h.0.attn.c_q.weight", "transformer.h.1.mlp.c_proj.weight"])
def test_configured_muon_steps_a_block_matrix_as_the_published_algorithm(name):
    """The Muon configure_optimizers builds (momentum, Nesterov, the AdamW-matching lr, decoupled decay) against
    the algorithm written out in float64, on a wide and a tall matrix of a real block."""
    model = make_model(**LAYOUTS["modern"])
    muon, _ = model.configure_optimizers(weight_decay=0.5, learning_rate=1e-2, betas=(0.9, 0.95),
                                         device_type="cpu", optimizer="muon")
    W = dict(model.named_parameters())[name]
    W0, got = W.detach().clone(), []
    torch.manual_seed(0)
    grads = [torch.randn_like(W), torch.randn_like(W)]  # the second step exercises the momentum buffer
    for g in grads:
        W.grad = g.clone()  # the other parameters have no gradient, so the step leaves them alone
        muon.step()
        got.append(W.detach().double().clone())
    want = reference_muon(W0, grads, lr=1e-2, weight_decay=0.5, momentum=0.95, nesterov=True)
    assert_steps_match(W0, got, want)


@pytest.mark.parametrize("nesterov,adjust_lr_fn", [(True, "match_rms_adamw"), (False, None)])
def test_batched_muon_steps_as_torch_muon_on_ragged_shapes(nesterov, adjust_lr_fn):
    """muon.Muon, which orthogonalises same-shape matrices together, against torch.optim.Muon (one at a time):
    square, wide and tall matrices, repeated shapes, a tall one that batches with a wide one, a matrix without a
    gradient; four steps, then torch's state loaded into a fresh muon.Muon (old checkpoints resume) and one more."""
    torch.manual_seed(0)
    shapes = [(48, 48), (48, 48), (40, 96), (96, 40), (96, 40), (7, 33), (33, 7), (1, 20), (24, 64)]
    theirs = [torch.nn.Parameter(torch.randn(s) / s[1] ** 0.5) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    kw = dict(lr=2e-2, weight_decay=0.3, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt_theirs, opt_ours = torch.optim.Muon(theirs, **kw), Muon(ours, **kw)

    def step():
        before = [p.detach().clone() for p in theirs]
        for i, (a, b) in enumerate(zip(theirs, ours)):
            a.grad = b.grad = None if i == 8 else torch.randn_like(a)
        opt_theirs.step()
        opt_ours.step()
        for i, (a, b, w0) in enumerate(zip(theirs, ours, before)):
            if i == 8:
                assert torch.equal(a, w0) and torch.equal(b, w0)
            else:  # to the bf16 Newton-Schulz's rounding, relative to the step (exact on this machine)
                assert (a - b).norm() <= 2e-3 * (a - w0).norm(), f"matrix {i} {tuple(a.shape)}"

    for _ in range(4):
        step()
    for a, b in zip(theirs[:8], ours):
        assert torch.allclose(opt_theirs.state[a]["momentum_buffer"], opt_ours.state[b]["momentum_buffer"])
    opt_ours = Muon(ours, **kw)
    opt_ours.load_state_dict(copy.deepcopy(opt_theirs.state_dict()))  # a copy, as a checkpoint holds
    step()


def test_muon_runs_one_newton_schulz_per_shape(monkeypatch):
    """The recipe's layout: per step one batched Newton-Schulz per distinct matrix shape, a tall matrix with its
    transpose (modern: q/k/v/proj 32x32 together, and the MLP's 32x64 down-projection with its 64x32 up-projections)."""
    calls = []

    def counted(G, *args):
        calls.append(tuple(G.shape))
        return newton_schulz(G, *args)

    newton_schulz = muon_py.newton_schulz
    monkeypatch.setattr(muon_py, "newton_schulz", counted)
    model = make_model(**LAYOUTS["modern"], mlp_hidden=64)
    muon, _ = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95),
                                         device_type="cpu", optimizer="muon")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    muon.step()
    L = model.config.n_layer
    assert sorted(calls) == sorted([(4 * L, 32, 32), (3 * L, 32, 64)])


# ---------------------------------------------------------------------------------------------------------------------
# counting


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flops_per_token_is_six_per_parameter_plus_attention(layout):
    model = make_model(**LAYOUTS[layout])
    cfg = model.config
    T = 12
    assert model.flops_per_token(T) == 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * T
    assert model.flops_per_token() == 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def test_num_params_counts_a_tied_embedding_once_and_leaves_out_only_lookup_tables():
    untied, tied = make_model(tie_embeddings=False), make_model(tie_embeddings=True)
    table = VOCAB * 32
    # the untied model has one more vocab x n_embd matrix; the tied one does not count its shared matrix twice
    assert untied.num_params(non_embedding=False) - tied.num_params(non_embedding=False) == table
    assert tied.num_params(non_embedding=False) == sum(p.numel() for p in set(tied.parameters()))
    # non_embedding drops the untied lookup table but keeps the head; tied, the matrix is the head and stays
    assert untied.num_params(non_embedding=False) - untied.num_params(non_embedding=True) == table
    assert tied.num_params(non_embedding=True) == tied.num_params(non_embedding=False)
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True)
    # gpt2 layout: the learned position table is a lookup too
    gpt2 = make_model(layout="gpt2")
    assert gpt2.num_params(non_embedding=False) - gpt2.num_params(non_embedding=True) == BLOCK * 32


# ---------------------------------------------------------------------------------------------------------------------
# training paths


@pytest.mark.parametrize("layout", ["modern_gqa_qknorm_untied", "gpt2"])
def test_grad_checkpoint_gives_the_same_loss_and_gradients(layout):
    results = []
    idx, targets = tokens(2, BLOCK, seed=1), tokens(2, BLOCK, seed=2)
    for grad_checkpoint in (False, True):
        model = make_model(grad_checkpoint=grad_checkpoint, **LAYOUTS[layout]).train()
        _, loss = model(idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name] is not None, name
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_loss_ignores_targets_of_minus_one():
    model = make_model()
    idx, targets = tokens(1, 8, seed=1), tokens(1, 8, seed=2)
    logits, _ = model(idx)
    masked = targets.clone()
    masked[0, 5:] = -1
    _, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[0, :5], targets[0, :5])
    torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=30, n_head=4), "n_embd=30 is not divisible by n_head=4"),
    (dict(n_head=4, n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
    (dict(layout="foo"), "layout must be 'modern' or 'gpt2', got 'foo'"),
])
def test_invalid_config_is_a_clear_value_error(overrides, message):
    with pytest.raises(ValueError) as err:
        tiny(**overrides)
    assert message in str(err.value)


def test_config_defaults_fill_kv_heads_and_mlp_width_per_layout():
    modern = tiny(n_embd=96, n_head=4)
    assert modern.n_kv_head == 4
    assert modern.mlp_hidden == 256  # 2/3 of 4*96 = 256, already a multiple of 64
    assert tiny(n_embd=128).mlp_hidden == 320  # 341.3 to the nearest multiple of 64
    assert tiny(n_embd=32).mlp_hidden == 64  # 85.3 to the nearest multiple of 64
    assert tiny(layout="gpt2", n_embd=32).mlp_hidden == 128  # plain 4*n_embd


@pytest.mark.parametrize("extra", [LAYOUTS["gpt2"], LAYOUTS["modern_gqa_qknorm_untied"],
                                   dict(n_expert=4, top_k=2, expert_hidden=16, n_shared_expert=1, moe_balance="bias"),
                                   dict(dre=True, n_layer=4, n_prelude=1, n_coda=1)],
                         ids=["gpt2", "gqa-qknorm-untied", "moe-shared", "dre"])
def test_a_model_built_on_meta_gets_the_weights_one_process_draws(extra):
    """GPT.materialize (what a sharded run starts from, each rank drawing only its parts) replays GPT.__init__'s
    draws: from the same seed, every parameter and buffer equal to GPT(config)'s bit for bit, the tie kept, and the
    generator left where GPT(config) leaves it (dropout and data draws after it are the same too)."""
    torch.manual_seed(7)
    ref = GPT(tiny(**extra))
    after_ref = torch.randn(4)
    torch.manual_seed(7)
    with torch.device("meta"):
        model = GPT(tiny(**extra))
    model.materialize("cpu")
    assert torch.equal(torch.randn(4), after_ref)
    want, got = ref.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    for (name, a), (_, b) in zip(ref.named_buffers(), model.named_buffers()):
        assert torch.equal(a, b), name
    assert (model.lm_head.weight is model.transformer.wte.weight) == model.config.tie_embeddings
