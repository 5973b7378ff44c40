"""reasoning.py (the Dynamic Reasoning Engine): the core loop is the recurrence written out by hand, adaptive exit
reduces to the fixed depth at threshold 0 and stops where the prediction settles, cached generation with early exits
equals the full forward and skips the steps, truncated backprop cuts the gradient, a trained toy spends its steps on
the tokens it cannot predict, training draws depend on the step alone, and train.py trains, logs and resumes a DRE
model."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import model as model_py
from conftest import ROOT, run_train
from model import GPT, GPTConfig
from reasoning import spearman, step_distribution

VOCAB, BLOCK, D = 50, 32, 32


def make_model(seed=0, **overrides):
    """A tiny DRE model with weights large enough that every token, position and step matters (as in test_model);
    its predictions settle after a different number of steps for each token, which is what early exit needs."""
    torch.manual_seed(seed)
    kwargs = dict(block_size=BLOCK, vocab_size=VOCAB, n_layer=3, n_head=4, n_embd=D, dre=True,
                  max_reasoning_steps=6, dre_mean_steps=3.0, dre_backprop_steps=2, dre_threshold=0.0)
    kwargs.update(overrides)
    model = GPT(GPTConfig(**kwargs))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tokens(B, T, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def by_hand(model, idx, r, frozen=0):
    """prelude -> r x core -> coda -> head: the core's blocks applied r times in a row; the state after the first
    `frozen` steps is a constant (no gradient reaches anything before them through it)."""
    cfg, t = model.config, model.transformer
    T = idx.size(1)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x = t.wte(idx)
    blocks = list(t.h)
    prelude, core, coda = (blocks[:cfg.n_prelude], blocks[cfg.n_prelude:cfg.n_layer - cfg.n_coda],
                           blocks[cfg.n_layer - cfg.n_coda:])
    for block in prelude:
        x = block(x, cos, sin)
    e = x
    for i in range(r):
        if i == frozen > 0:
            x = x.detach()
        s = x
        for block in core:
            x = block(x, cos, sin)
        if cfg.dre_inject:  # the step's update lands on the prelude's output
            x = e + (x - s)
    for block in coda:
        x = block(x, cos, sin)
    return model.lm_head(t.ln_f(x))


SHAPES = {
    "1+1+1": dict(),
    "core of 2 blocks": dict(n_layer=5, n_prelude=2, n_coda=1),
    "no prelude": dict(n_layer=2, n_prelude=0, n_coda=1),
    "no coda": dict(n_layer=3, n_prelude=1, n_coda=0),  # the benchmark's shape: the head reads the core's state
    "MoE core": dict(n_expert=4, top_k=2, expert_hidden=32),
    "input injection": dict(dre_inject=True),
    "injection, core of 2 blocks": dict(n_layer=5, n_prelude=2, n_coda=1, dre_inject=True),
}
EXITS = {"kl": dict(dre_exit="kl", dre_threshold=0.05),
         "kl, no coda": dict(dre_exit="kl", dre_threshold=0.05, n_coda=0),
         "state": dict(dre_exit="state", dre_threshold=0.3),
         "state, injected": dict(dre_exit="state", dre_threshold=0.4, dre_inject=True)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [1, 4])
def test_r_core_steps_equal_r_applications_written_out(shape, r):
    model = make_model(**SHAPES[shape])
    idx = tokens(2, 12)
    with torch.no_grad():
        expected = by_hand(model, idx, r)
        torch.testing.assert_close(model(idx, steps=r)[0], expected)  # evaluation
        model.train()
        torch.testing.assert_close(model(idx, steps=r)[0], expected)  # the training path (no dropout here)


def test_core_weights_appear_once_in_the_parameters():
    model = make_model(n_layer=4, n_prelude=1, n_coda=1)
    dense = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=D))
    assert model.num_params() == dense.num_params()  # the same model, run differently
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and sum(".h.1.attn.c_q" in n for n in names) == 1


@pytest.mark.parametrize("exit", EXITS)
def test_threshold_zero_runs_every_token_max_steps_and_equals_the_fixed_depth(exit):
    model = make_model(**EXITS[exit])
    idx = tokens(2, 20)
    with torch.no_grad():
        adaptive = model(idx, threshold=0.0)[0]
        assert (model.depth.last_steps == 6).all()
        model.train()
        fixed = model(idx, steps=6)[0]  # the training path: 6 steps for everyone, no exit machinery
        model.eval()
        torch.testing.assert_close(adaptive, fixed)
        model(idx)  # and the model's positive threshold does stop some tokens early
        assert model.depth.last_steps.min() < 6


@pytest.mark.parametrize("exit", EXITS)
def test_steps_and_threshold_as_arguments_equal_the_same_settings_written_into_the_config(exit):
    # before the arguments, callers wrote the settings into model.config: here into a copy's
    model = make_model(**EXITS[exit])
    config = dict(vars(model.config))
    idx, prompt, t = tokens(2, 12), tokens(2, 4), EXITS[exit]["dre_threshold"]

    def run(m, **depth):  # a forward's logits and steps, and the logits each generated token was drawn from
        generated = []
        with torch.no_grad():
            logits = m(idx, **depth)[0]
            steps = m.depth.last_steps.clone()
            m.generate(prompt, 12, temperature=0.0, observe=lambda x, _: generated.append(x), **depth)
        return logits, steps, torch.cat(generated, 1)

    for steps, threshold in ((None, t / 2), (3, 0.0), (3, t), (8, 0.0), (8, t)):  # 8: more than the config's 6
        old = copy.deepcopy(model)
        old.config.max_reasoning_steps = steps or old.config.max_reasoning_steps
        old.config.dre_threshold = threshold
        for new, was in zip(run(model, steps=steps, threshold=threshold), run(old)):
            assert torch.equal(new, was), (steps, threshold)
    assert vars(model.config) == config


@pytest.mark.parametrize("exit", EXITS)
@pytest.mark.parametrize("B", [1, 2])
def test_generation_with_early_exit_equals_the_full_forward_with_the_same_steps(B, exit, monkeypatch):
    model = make_model(**EXITS[exit])
    recur = model.depth
    prompt = tokens(B, 5)
    steps, logits = [], []
    sample_next = model_py.sample_next
    monkeypatch.setattr(model_py, "sample_next", lambda x, *a: logits.append(x.clone()) or sample_next(x, *a))
    hook = recur.register_forward_hook(lambda m, i, o: steps.append(m.last_steps.clone()))
    out = model.generate(prompt, 20, temperature=0.0)
    hook.remove()
    steps = torch.cat(steps, dim=1)  # the steps of positions 0 .. T-2 (the last token was never run)
    assert steps.shape == (B, out.size(1) - 1)
    # the test means something only if tokens stopped at different steps, and later tokens ran steps that earlier
    # ones had skipped (so they read keys/values filled in from the earlier tokens' last step)
    assert steps.min() < steps.max()
    assert any((steps[b, :t] < steps[b, t]).any() for b in range(B) for t in range(steps.size(1)))
    with torch.no_grad():
        full = model(out[:, :-1], steps=steps)[0]
    generated = torch.stack(logits, dim=1)  # the logits each new token was sampled from
    torch.testing.assert_close(generated, full[:, prompt.size(1) - 1:], rtol=1e-4, atol=1e-4)
    assert torch.equal(out[:, prompt.size(1):], full[:, prompt.size(1) - 1:].argmax(-1))


def test_at_batch_1_a_token_runs_only_the_core_steps_it_needs():
    model = make_model(dre_threshold=0.05)
    recur, core = model.depth, model.transformer.h[1]
    calls, steps = [], []
    core.register_forward_hook(lambda m, i, o: calls.append(1))
    recur.register_forward_hook(lambda m, i, o: steps.append(m.last_steps.clone()))
    model.generate(tokens(1, 1), 30, temperature=0.0)
    per_token = torch.cat(steps, dim=1)[0]
    assert per_token.min() < 6
    assert len(calls) == per_token.sum()  # not 6 per token


def test_a_token_stops_at_the_first_step_whose_prediction_moved_less_than_the_threshold():
    # one-token sequences: nothing else in the batch affects a token, so its exit can be worked out from fixed depths
    model = make_model(dre_threshold=0.05)
    idx = tokens(32, 1)
    with torch.no_grad():
        logp = [model(idx, steps=r)[0][:, 0].log_softmax(-1) for r in range(1, 7)]
        kl = [(p.exp() * (p - q)).sum(-1) for q, p in zip(logp, logp[1:])]  # KL(after step i || after step i-1)
        expected = [next((i + 2 for i in range(5) if kl[i][b] < 0.05), 6) for b in range(32)]
        model(idx)
    assert len(set(expected)) > 1
    assert model.depth.last_steps[:, 0].tolist() == expected


def test_the_state_test_stops_at_the_first_step_whose_state_moved_less_than_the_threshold():
    # one-token sequences again; the states s_1..s_6 written out with by_hand's loop (prelude, then the core)
    for inject in (False, True):
        model = make_model(dre_exit="state", dre_threshold=0.3, dre_inject=inject)
        idx = tokens(32, 1)
        t, cos, sin = model.transformer, model.rope_cos[:1], model.rope_sin[:1]
        with torch.no_grad():
            e = t.h[0](t.wte(idx), cos, sin)
            states = [e]
            for _ in range(6):
                s = t.h[1](states[-1], cos, sin)
                states.append(e + s - states[-1] if inject else s)
            moved = [(b - a).norm(dim=-1)[:, 0] / b.norm(dim=-1)[:, 0] for a, b in zip(states, states[1:])]
            expected = [next((i + 1 for i in range(6) if moved[i][b] < 0.3), 6) for b in range(32)]
            model(idx)
        assert len(set(expected)) > 1
        assert model.depth.last_steps[:, 0].tolist() == expected


def test_the_state_test_runs_the_coda_and_head_once_per_token_and_the_kl_test_every_step():
    for exit, per_token in (("state", lambda steps: 1), ("kl", lambda steps: steps)):
        model = make_model(**EXITS[exit])
        coda, calls, steps = model.transformer.h[2], [], []
        coda.register_forward_hook(lambda m, i, o: calls.append(1))
        model.depth.register_forward_hook(lambda m, i, o: steps.append(m.last_steps.clone()))
        model.generate(tokens(1, 1), 20, temperature=0.0)
        runs = torch.cat(steps, dim=1)[0]  # at batch 1, the KL test's coda runs as many steps as the token ran
        assert runs.min() < runs.max()
        assert len(calls) == sum(per_token(int(r)) for r in runs)


def test_dpo_of_a_dre_policy_against_itself_is_ln2_in_training_mode_too():
    # the policy draws r in training; the frozen reference (eval mode) must run the same r, not its threshold's
    import constitution
    model = make_model(dre_threshold=0.05)
    ref = constitution.reference_model(model, "cpu")
    x, y = tokens(4, 12), tokens(4, 12, seed=2)
    for train in (True, False):
        for _ in range(3):
            loss, stats = constitution.dpo_forward(model.train(train), ref, x, y, torch.ones(2), beta=0.5)
            assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and stats["margin"].abs().item() < 1e-6
    loss, _ = constitution.dpo_forward(model.train(), make_model(seed=3), x, y, torch.ones(2), beta=0.5)
    assert abs(loss.item() - math.log(2)) > 1e-3  # another reference does move it


def test_the_reference_learns_a_training_policy_s_steps_without_a_host_sync():
    """B3: in training every token ran the drawn r, which is known on the host: policy_steps reads nothing back from
    the device (no .item(), no boolean of a tensor) on each DPO micro-step."""
    import constitution
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
                self.ops.append(func)
            return func(*args, **(kwargs or {}))

    model = make_model().train()
    model(tokens(2, 12))
    with Syncs() as syncs:
        steps = constitution.policy_steps(model)
    assert syncs.ops == [] and steps == model.depth.sampled[-1] and isinstance(steps, int)


def test_backprop_depth_cuts_the_gradient_before_the_last_k_steps():
    model = make_model(dre_backprop_steps=2).train()
    idx = tokens(2, 10)
    prelude, core = model.transformer.h[0], model.transformer.h[1]

    def step_gradients(r):
        deltas, e, core_inputs = [], [], []

        def add_delta(module, inputs, output):  # a zero perturbation of each step's output, to read its gradient
            deltas.append(torch.zeros_like(output, requires_grad=True))
            return output + deltas[-1]

        def keep(into):
            def hook(module, inputs, output=None):
                x = inputs[0] if output is None else output
                if x.requires_grad:
                    x.retain_grad()
                into.append(x)
            return hook

        hooks = [core.register_forward_hook(add_delta), prelude.register_forward_hook(keep(e)),
                 core.register_forward_pre_hook(keep(core_inputs))]
        _, loss = model(idx, idx, steps=r)
        model.zero_grad()
        loss.backward()
        for h in hooks:
            h.remove()
        # the skipped steps pass the gradient from the first step with grad to the prelude's output unchanged (the
        # residual path), and none into the core through themselves
        first = core_inputs[max(r - model.config.dre_backprop_steps, 0)]
        assert first.grad is not None and first.grad.abs().sum() > 0  # (a detached state would have none)
        torch.testing.assert_close(e[0].grad, first.grad, rtol=0, atol=0)
        return [d.grad is not None and d.grad.abs().sum().item() > 0 for d in deltas]

    assert step_gradients(5) == [False, False, False, True, True]
    assert step_gradients(2) == [True, True]
    assert prelude.attn.c_q.weight.grad.abs().sum() > 0
    model.config.dre_backprop_steps = 5
    assert step_gradients(5) == [True] * 5


def test_the_progressive_loss_cuts_the_gradient_after_a_drawn_n_steps_in_its_share_of_the_batch():
    # Bansal et al. 2022, written out: of a batch of 4 at dre_progressive=0.5, the first 2 sequences' loss reaches
    # the weights through the steps after the first n only (n drawn 0 .. r-1 per optimizer step), the others' through
    # all r; the model's gradient must be that of the sum, for one n, and n must vary with the step
    model = make_model(n_coda=0, dre_progressive=0.5, dre_backprop_steps=6, dre_mean_steps=4.0).train()
    idx, targets = tokens(4, 10), tokens(4, 10, seed=2)
    params = list(model.parameters())

    def gradients(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, allow_unused=True,
                                                                    materialize_grads=True)])

    def ce_sum(logits, t):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), t.reshape(-1), reduction="sum")

    cuts = []
    for it in range(6):
        model.depth.iteration = it
        got = gradients(model(idx, targets)[1])
        r = model.depth.pop_sampled()[-1]
        matches = [n for n in range(r) if torch.allclose(got, gradients(
            (ce_sum(by_hand(model, idx[:2], r, n), targets[:2]) + ce_sum(by_hand(model, idx[2:], r), targets[2:]))
            / idx.numel()), atol=1e-6)]
        assert len(matches) == 1, (r, matches)  # and n = 0 (no cut) differs from the rest
        cuts.append((r, matches[0]))
    assert len(set(n for _, n in cuts)) > 1 and any(n > 0 for _, n in cuts), cuts
    model.config.dre_progressive = 0.0  # and without it, every sequence's gradient runs through all r steps
    got = gradients(model(idx, targets)[1])
    r = model.depth.pop_sampled()[-1]
    torch.testing.assert_close(got, gradients(ce_sum(by_hand(model, idx, r), targets) / idx.numel()))


def test_a_trained_toy_spends_more_steps_on_the_tokens_it_finds_harder():
    # every second token is a fixed function of the one before (learnable: low loss), the others are random (high
    # loss whatever the model does). After a short training the unpredictable tokens should run more core steps.
    V, T = 16, 32

    def batch(gen, B):
        x = torch.randint(0, V, (B, T + 1), generator=gen)
        x[:, 1::2] = (3 * x[:, 0:-1:2] + 1) % V
        return x[:, :-1], x[:, 1:]

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=3, n_head=2, n_embd=32, dre=True, max_reasoning_steps=6,
                          dre_mean_steps=3.0, dre_backprop_steps=3, dre_threshold=1e-3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        _, loss = model(*batch(gen, 32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x, y = batch(torch.Generator().manual_seed(1), 64)
        logits, loss = model(x, y)
        model.depth.observe(logits, y)
    steps = model.depth.last_steps.float()
    m = model.depth.metrics()
    assert loss < 0.75 * math.log(V)  # it learned the predictable half
    assert m["spearman"] > 0.3, m
    predictable, random_ = steps[:, 0::2].mean().item(), steps[:, 1::2].mean().item()  # targets at odd / even places
    assert random_ > predictable + 1, (predictable, random_)


def test_training_draws_follow_the_distribution_and_depend_only_on_the_step():
    probs = step_distribution(4.0, 8)
    assert probs.sum().item() == pytest.approx(1.0) and (probs >= 0).all() and probs[0] > 0
    # r = 1 + Poisson(lambda), E[lambda] = mean - 1: without clipping the mean is the requested one
    assert (step_distribution(4.0, 60) * torch.arange(1, 61)).sum().item() == pytest.approx(4.0, abs=1e-3)
    recur = make_model(max_reasoning_steps=8, dre_sample_steps=True, dre_mean_steps=4.0).depth
    fresh = [recur.sample_steps() for _ in range(2000)]  # iteration None: a new draw each time
    by_step = []
    for i in range(2000):
        recur.iteration = i
        by_step.append(recur.sample_steps())
    for draws in (fresh, by_step):
        assert min(draws) == 1 and max(draws) == 8
        assert sum(draws) / len(draws) == pytest.approx(recur.expected_steps()[0], abs=0.12)
    # with the optimizer step set, r is a function of the step alone: every micro-batch and every rank (another
    # process, another model object) draws the same one, and so does a run resumed at that step
    assert recur.sample_steps() == by_step[-1]
    other = make_model(seed=1, max_reasoning_steps=8, dre_sample_steps=True, dre_mean_steps=4.0).depth
    other.iteration = 1234
    assert other.sample_steps() == by_step[1234]


def test_flops_per_token_counts_the_mean_steps_of_the_core():
    # one step is a plain pass through every block: the dense formula
    one = make_model(n_layer=4, max_reasoning_steps=1, dre_sample_steps=False)
    dense = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=D))
    assert one.flops_per_token() == dense.flops_per_token()
    # r steps forward, min(r, k) backward for the core (2 blocks), once for the rest
    model = make_model(n_layer=4, max_reasoning_steps=8, dre_sample_steps=True, dre_mean_steps=4.0,
                       dre_backprop_steps=2)
    fwd, bwd = model.depth.expected_steps()
    assert 3.5 < fwd < 4.0 and 1.5 < bwd < 2.0  # clipping at 8 trims the mean; k=2 caps the backward
    core = 2 * sum(p.numel() for p in dense.transformer.h[0].parameters())
    outside = dense.num_params() - 2 * sum(p.numel() for p in dense.transformer.h[0].parameters())
    attention = 12 * 2 * D * BLOCK + (4 * fwd + 8 * bwd) * 2 * D * BLOCK
    assert model.flops_per_token() == pytest.approx(6 * outside + (2 * fwd + 4 * bwd) * core + attention)
    # trained at a fixed depth: every step runs max_reasoning_steps forward, the last k of them backward
    fixed = make_model(n_layer=4, max_reasoning_steps=8, dre_sample_steps=False, dre_backprop_steps=2)
    assert fixed.depth.expected_steps() == (8.0, 2.0)
    fixed.train()(tokens(2, 8))
    assert fixed.depth.pop_sampled() == [8]


def test_spearman_matches_a_hand_worked_example():
    # ranks of x: 1, 2.5, 2.5, 4 (a tie); of y: 1, 3, 2, 4 -> Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    x, y = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert spearman(x, y) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman(y, -y) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.ones(4), y))


def test_bad_configurations_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="core"):
        GPTConfig(n_layer=2, dre=True, n_prelude=1, n_coda=1)
    with pytest.raises(ValueError, match="dre_mean_steps"):
        GPTConfig(n_layer=3, dre=True, max_reasoning_steps=4, dre_sample_steps=True, dre_mean_steps=6.0)
    with pytest.raises(ValueError, match="dre_progressive"):
        GPTConfig(n_layer=3, dre=True, dre_progressive=1.5)
    model = make_model()
    with pytest.raises(ValueError, match="shape"):
        model(tokens(2, 8), steps=torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="same number"):
        model.train()(tokens(2, 8), steps=torch.ones(2, 8, dtype=torch.long))


TINY_DRE = ["--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--n_layer=3", "--n_head=2",
            "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2", "--log_interval=1",
            "--warmup_iters=2", "--lr_decay_iters=100", "--learning_rate=3e-3", "--dre=True",
            "--max_reasoning_steps=5", "--dre_sample_steps=True", "--dre_mean_steps=3.0",
            "--dre_backprop_steps=2"]


def metrics(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_train_py_trains_a_dre_model_logs_its_steps_and_resumes_exactly(char_data, tmp_path):
    run_train([*TINY_DRE, f"--out_dir={tmp_path / 'whole'}", "--max_iters=8", "--eval_interval=4"], char_data)
    run_train([*TINY_DRE, f"--out_dir={tmp_path / 'split'}", "--max_iters=4", "--eval_interval=4"], char_data)
    run_train([*TINY_DRE, f"--out_dir={tmp_path / 'split'}", "--max_iters=8", "--eval_interval=4",
               "--init_from=resume", "--dre_threshold=0.1"], char_data)  # an inference setting: no new model
    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    steps = {r["iter"]: r["dre_steps"] for r in whole if "dre_steps" in r}
    assert sorted(steps) == list(range(1, 9)) and all(len(s) == 1 and 1 <= s[0] <= 5 for s in steps.values())
    assert len({s[0] for s in steps.values()}) > 1  # drawn, not fixed
    # the resumed run draws the same core steps and so computes the same losses, bit for bit
    assert {r["iter"]: (r["dre_steps"], r["loss"]) for r in split if "dre_steps" in r} == \
        {r["iter"]: (r["dre_steps"], r["loss"]) for r in whole if "dre_steps" in r}
    evals = [r for r in whole if "val_loss" in r]
    dre = evals[-1]["val_dre"]
    assert sum(dre["histogram"]) == dre["tokens"] == 2 * 4 * 32 and 1 <= dre["mean_steps"] <= 5
    assert dre["core_flops_per_token"] > 0
    ckpt = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["dre"] and ckpt["model_args"]["dre_threshold"] == 0.1
    # a curriculum stage starts from a run's weights and draws its steps its own way (here: always 3)
    run_train([*TINY_DRE, f"--out_dir={tmp_path / 'stage'}", "--max_iters=3", "--eval_interval=3",
               f"--init_from={tmp_path / 'whole'}", "--dre_sample_steps=False", "--max_reasoning_steps=3"], char_data)
    assert [r["dre_steps"] for r in metrics(tmp_path / "stage") if "dre_steps" in r] == [[3]] * 3
    args = torch.load(tmp_path / "stage" / "ckpt.pt", weights_only=True)["model_args"]
    assert (args["dre_sample_steps"], args["max_reasoning_steps"]) == (False, 3)


STAGES_TINY = ["--device=cpu", "--dtype=float32", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4",
               "--eval_iters=1"]


def start_stages(tmp_path, *args):
    """config/reasoning_dre_stages.sh at a toy's size (the arguments after the script's own go to every stage), its
    runs and data under tmp_path, no benchmark; in its own process group, so that a test can signal it whole."""
    env = {**os.environ, "OUT": str(tmp_path / "dre"), "DATA": str(tmp_path / "data"), "BENCH": "0",
           "PYTHON": sys.executable}
    # Ctrl-C as from a terminal: a test run started in the background (`cmd &`, as CI may) ignores SIGINT, and a
    # shell that starts with it ignored cannot trap it, so the script would go on to the next stage
    reset = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    return subprocess.Popen(["bash", os.path.join(ROOT, "config", "reasoning_dre_stages.sh"), *STAGES_TINY, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=reset)


@pytest.mark.slow
def test_the_staged_recipe_runs_its_four_stages_each_from_the_last(tmp_path):
    """The script makes the data it documents and runs four stages, each one's settings and starting weights as the
    README's table says."""
    proc = start_stages(tmp_path, "--max_iters=2", "--lr_decay_iters=2", "--warmup_iters=1", "--eval_interval=2")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    for name, train_max in (("reasoning1", 1), ("reasoning2", 2), ("reasoning", 4)):
        with open(tmp_path / "data" / name / "meta.json") as f:
            assert json.load(f)["train_max"] == train_max
    runs = [torch.load(tmp_path / f"dre{n}" / "ckpt.pt", weights_only=True) for n in (1, 2, 3, 4)]
    assert [os.path.basename(c["config"]["dataset"]) for c in runs] == ["reasoning1", "reasoning2", "reasoning",
                                                                       "reasoning"]
    assert [c["config"]["init_from"] for c in runs] == ["scratch"] + [str(tmp_path / f"dre{n}") for n in (1, 2, 3)]
    assert [c["model_args"]["max_reasoning_steps"] for c in runs] == [6, 6, 8, 8]
    assert [c["config"]["learning_rate"] for c in runs] == [5e-3, 5e-3, 3e-3, 2e-3]
    assert all(c["model_args"]["n_embd"] == 32 and not c["model_args"]["dre_inject"] for c in runs)


@pytest.mark.slow
def test_a_signal_stops_the_staged_recipe_where_it_is(tmp_path):
    """Ctrl-C during a stage: train.py saves and exits 0, and the script must not go on to the next stage."""
    proc = start_stages(tmp_path, "--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=100000",
                        "--log_interval=1")
    log, deadline = tmp_path / "dre1" / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (log.exists() and sum('"loss"' in line for line in open(log)) >= 2):
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the script and the stage alike
        out, err = proc.communicate(timeout=120)
    finally:  # a script that went on to the next stage must not outlive the test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "stopped by signal" in out, out[-2000:] + err[-2000:]
    assert "error: stopped at stage 1 of 4" in err and not (tmp_path / "dre2").exists()
    assert torch.load(tmp_path / "dre1" / "ckpt.pt", weights_only=True)["iter_num"] >= 2
