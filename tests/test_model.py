"""The imitator: its sliding-window attention makes cached rollouts equal forward() over the whole
stream, it can fit data, and its args round-trip."""

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.model import Imitator, ModelArgs, sample_actions
from pipeline.rollout import ImitatorPolicy, left_padded

N_ACTIONS = 3
TINY = dict(n_layer=2, n_head=2, n_embd=16, context_steps=8)
ARGS_BY_KIND = {
    "discrete": ModelArgs("discrete", (), obs_n=7, n_actions=N_ACTIONS, **TINY),
    "vector": ModelArgs("vector", (5,), obs_n=0, n_actions=N_ACTIONS, **TINY),
    "image": ModelArgs("image", (36, 40), obs_n=0, n_actions=N_ACTIONS, frame_stack=2, **TINY),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_stream(args: ModelArgs, batch: int, steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random stream of `steps` env steps per env, with episode boundaries, in the token layout."""
    g = torch.Generator().manual_seed(seed)
    if args.obs_kind == "discrete":
        obs = torch.randint(args.obs_n, (batch, steps), generator=g)
    elif args.obs_kind == "vector":
        obs = torch.randn(batch, steps, *args.obs_shape, generator=g)
    else:
        obs = torch.randint(256, (batch, steps, args.frame_stack, *args.obs_shape), generator=g, dtype=torch.uint8)
    actions = torch.randint(args.n_actions, (batch, steps), generator=g)
    rewards = torch.randn(batch, steps, generator=g)
    first = torch.rand(batch, steps, generator=g) < 0.2
    first[:, 0] = True
    prev_action = torch.cat([torch.full((batch, 1), args.n_actions), actions[:, :-1]], dim=1)
    prev_reward = torch.cat([torch.zeros(batch, 1), rewards[:, :-1]], dim=1)
    return dict(obs=obs, prev_action=prev_action, prev_reward=prev_reward, first=first, targets=actions)


def inputs_at(stream, t):
    return [stream[k][:, t] for k in ("obs", "prev_action", "prev_reward", "first")]


def inputs_between(stream, start, stop):
    return [stream[k][:, start:stop] for k in ("obs", "prev_action", "prev_reward", "first")]


def tiny_model(args: ModelArgs, seed: int = 0) -> Imitator:
    torch.manual_seed(seed)
    return Imitator(args).eval()


def cached_logits(model: Imitator, stream, steps: int) -> list[torch.Tensor]:
    cache = model.init_cache(batch_size=stream["prev_action"].shape[0])
    return [model.step(cache, *inputs_at(stream, t)) for t in range(steps)]


@pytest.mark.parametrize("kind", ARGS_BY_KIND)
def test_cached_steps_equal_forward_on_the_whole_stream(kind):
    """At every step, also well past the window, the KV cache gives forward() over all steps so far."""
    args = ARGS_BY_KIND[kind]
    model, steps = tiny_model(args), 3 * args.context_steps  # 16 steps past the context window of 8
    stream = random_stream(args, batch=2, steps=steps)
    cache = model.init_cache(batch_size=2)
    with torch.no_grad():
        full, _ = model(*inputs_between(stream, 0, steps))  # (2, steps, n_actions), banded mask
        for t in range(steps):
            cached = model.step(cache, *inputs_at(stream, t))
            prefix, _ = model(*inputs_between(stream, 0, t + 1))
            torch.testing.assert_close(cached, prefix[:, -1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(cached, full[:, t], atol=1e-5, rtol=1e-4)
    assert cache.position == steps


def test_banded_forward_is_plain_causal_up_to_the_context():
    """Up to context_steps positions the band mask (T > context_steps) and the is_causal fast path
    (T <= context_steps) give the same logits; so do the cache and forward() on short streams."""
    args = ARGS_BY_KIND["vector"]
    model, W = tiny_model(args), args.context_steps
    stream = random_stream(args, batch=2, steps=W + 5, seed=3)
    with torch.no_grad():
        banded, _ = model(*inputs_between(stream, 0, W + 5))
        for T in (1, W // 2, W):
            causal, _ = model(*inputs_between(stream, 0, T))
            torch.testing.assert_close(banded[:, :T], causal, atol=1e-5, rtol=1e-4)
    cached = cached_logits(model, stream, W)
    torch.testing.assert_close(cached[-1], causal[:, -1], atol=1e-5, rtol=1e-4)
    # The band is W tokens wide: with one layer, position W sees steps 1..W, no longer step 0.
    one_layer = tiny_model(replace(args, n_layer=1))
    altered = {k: v.clone() for k, v in stream.items()}
    altered["obs"][:, 0] += 1.0
    with torch.no_grad():
        logits = [one_layer(*inputs_between(s, 0, W + 5))[0] for s in (stream, altered)]
    assert not torch.allclose(logits[0][:, W - 1], logits[1][:, W - 1])
    torch.testing.assert_close(logits[0][:, W:], logits[1][:, W:])


def test_the_receptive_field_ends_n_layer_windows_back():
    """The output at step t depends on steps t - n_layer * (context_steps - 1) .. t: a step inside
    that reach changes the logits, one beyond it does not, in the cache as in forward()."""
    args = ARGS_BY_KIND["discrete"]
    model = tiny_model(args)
    reach = args.n_layer * (args.context_steps - 1)  # 14
    steps = reach + 4
    stream = random_stream(args, batch=1, steps=steps)
    altered = {k: v.clone() for k, v in stream.items()}
    altered["obs"][:, 0] = (altered["obs"][:, 0] + 1) % args.obs_n
    cached = [cached_logits(model, s, steps) for s in (stream, altered)]
    with torch.no_grad():
        full = [model(*inputs_between(s, 0, steps))[0] for s in (stream, altered)]
    for t in (args.context_steps, reach):  # past one window, still within n_layer windows
        assert not torch.allclose(cached[0][t], cached[1][t])
        assert not torch.allclose(full[0][:, t], full[1][:, t])
    for t in range(reach + 1, steps):
        torch.testing.assert_close(cached[0][t], cached[1][t])
        torch.testing.assert_close(full[0][:, t], full[1][:, t])


def test_recomputing_the_last_window_is_a_different_function_past_the_context():
    """With n_layer >= 2, forward() on the last context_steps steps (the benchmark's recompute
    baseline) agrees with the cache within the first window only: later it cuts the receptive field."""
    args = ARGS_BY_KIND["discrete"]
    model, W = tiny_model(args), args.context_steps
    stream = random_stream(args, batch=2, steps=2 * W, seed=4)
    cached = cached_logits(model, stream, 2 * W)
    with torch.no_grad():
        window = [model(*inputs_between(stream, max(0, t + 1 - W), t + 1))[0][:, -1] for t in range(2 * W)]
    for t in range(W):
        torch.testing.assert_close(cached[t], window[t], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cached[2 * W - 1], window[2 * W - 1], atol=1e-6, rtol=0)


def test_batched_steps_equal_each_env_alone():
    args = ARGS_BY_KIND["vector"]
    model, n_envs, steps = tiny_model(args), 3, 12
    stream = random_stream(args, batch=n_envs, steps=steps, seed=1)
    batched_cache = model.init_cache(batch_size=n_envs)
    alone_caches = [model.init_cache(batch_size=1) for _ in range(n_envs)]
    for t in range(steps):
        batched = model.step(batched_cache, *inputs_at(stream, t))
        for env, cache in enumerate(alone_caches):
            alone = model.step(cache, *[x[env : env + 1] for x in inputs_at(stream, t)])
            torch.testing.assert_close(batched[env : env + 1], alone, atol=1e-5, rtol=1e-4)


def env_steps(args: ModelArgs, steps: int, seed: int):
    """What an env shows a policy over `steps` steps, single frames: obs (T, ...), action, reward, first."""
    g = np.random.default_rng(seed)
    if args.obs_kind == "discrete":
        obs = g.integers(args.obs_n, size=steps)
    elif args.obs_kind == "vector":
        obs = g.standard_normal((steps, *args.obs_shape)).astype(np.float32)
    else:
        obs = g.integers(256, size=(steps, *args.obs_shape), dtype=np.uint8)
    return obs, g.integers(args.n_actions, size=steps), g.standard_normal(steps).astype(np.float32), g.random(steps) < 0.2


def logits_recorded(model: Imitator) -> list[torch.Tensor]:
    """The logits of every step() of `model` from now on, in order."""
    recorded, step = [], model.step
    model.step = lambda *args: recorded.append(step(*args)) or recorded[-1]
    return recorded


@pytest.mark.parametrize("kind", ARGS_BY_KIND)
def test_batched_prime_then_rollout_acts_as_each_env_alone(kind):
    """Envs primed in one cache with their own recorded steps, of different lengths (past the
    window, short, none: left-padded), then rolled out greedily in lockstep, get the logits and
    actions of one batch-1 policy per env primed with its steps alone."""
    args = ARGS_BY_KIND[kind]
    W, lengths = args.context_steps, [args.context_steps + 3, 2, 0]
    recorded = [env_steps(args, length, seed) for seed, length in enumerate(lengths)]
    shown = [env_steps(args, 2 * W, seed=10 + env) for env in range(3)]  # obs, -, reward, first after the prime
    batched = ImitatorPolicy(tiny_model(args), batch_size=3, temperature=0.0)
    batched.prime(*left_padded(recorded))
    alone = [ImitatorPolicy(tiny_model(args), batch_size=1, temperature=0.0) for _ in recorded]
    for policy, steps in zip(alone, recorded):
        policy.prime(*(array[None] for array in steps))
    logits = [logits_recorded(policy.model) for policy in [batched, *alone]]
    for t in range(2 * W):
        obs, reward, first = (np.stack([env[k][t] for env in shown]) for k in (0, 2, 3))
        actions = batched.act(obs, first)
        assert list(actions) == [policy.act(obs[i:i + 1], first[i:i + 1])[0] for i, policy in enumerate(alone)], t
        batched.observe(reward)
        for i, policy in enumerate(alone):
            policy.observe(reward[i:i + 1])
    for env in range(3):
        torch.testing.assert_close(torch.stack(logits[0])[:, env], torch.stack(logits[1 + env])[:, 0], atol=1e-5, rtol=1e-4)
    assert batched.cache.real is None  # every padding token has left the window


def test_step_rejects_a_batch_the_cache_was_not_built_for():
    args = ARGS_BY_KIND["discrete"]
    model = tiny_model(args)
    stream = random_stream(args, batch=2, steps=1)
    with pytest.raises(ValueError, match="batch"):
        model.step(model.init_cache(batch_size=3), *inputs_at(stream, 0))


def test_tiny_model_overfits_a_fixed_sequence():
    args = replace(ARGS_BY_KIND["discrete"], n_embd=32, context_steps=16)
    model = tiny_model(args).train()
    stream = random_stream(args, batch=2, steps=16, seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(*inputs_between(stream, 0, 16), targets=stream["targets"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_args_round_trip_rebuilds_the_same_model():
    args = ARGS_BY_KIND["image"]
    model = tiny_model(args)
    rebuilt_args = ModelArgs.from_dict(json.loads(json.dumps(asdict(args))))
    assert rebuilt_args == args and isinstance(rebuilt_args.obs_shape, tuple)
    rebuilt = tiny_model(rebuilt_args, seed=1)
    rebuilt.load_state_dict(model.state_dict())
    stream = random_stream(args, batch=2, steps=4)
    torch.testing.assert_close(rebuilt(*inputs_between(stream, 0, 4))[0], model(*inputs_between(stream, 0, 4))[0])


@pytest.mark.parametrize(
    "field, bad",
    [
        ("obs_kind", dict(obs_kind="graph")),
        ("obs_shape", dict(obs_shape=(5, 5))),
        ("obs_shape", dict(obs_kind="image", obs_shape=(20, 20))),
        ("obs_n", dict(obs_n=0)),
        ("n_actions", dict(n_actions=0)),
        ("n_embd", dict(n_embd=15, n_head=2)),
        ("n_embd", dict(n_embd=12, n_head=4)),  # head size 3 is odd
        ("context_steps", dict(context_steps=0)),
        ("dropout", dict(dropout=1.0)),
    ],
)
def test_invalid_args_raise_naming_the_field(field, bad):
    with pytest.raises(ValueError, match=field):
        ModelArgs(**{**asdict(ARGS_BY_KIND["discrete"]), **bad})


def test_forward_takes_sequences_longer_than_the_context():
    args = ARGS_BY_KIND["image"]
    model, T = tiny_model(args).train(), 3 * args.context_steps
    stream = random_stream(args, batch=2, steps=T)
    logits, loss = model(*inputs_between(stream, 0, T), targets=stream["targets"])
    assert logits.shape == (2, T, N_ACTIONS) and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_sample_actions_greedy_at_zero_temperature():
    logits = torch.randn(50, N_ACTIONS, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_actions(logits, temperature=0.0), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sample_actions_follow_the_softmax(temperature):
    logits = torch.tensor([[1.0, 0.0, -1.0]]).expand(20000, N_ACTIONS)
    actions = sample_actions(logits, temperature, generator=torch.Generator().manual_seed(0))
    empirical = torch.bincount(actions, minlength=N_ACTIONS).float() / len(actions)
    torch.testing.assert_close(empirical, F.softmax(logits[0] / temperature, -1), atol=0.02, rtol=0)


def test_loss_ignores_targets_of_minus_one():
    args = ARGS_BY_KIND["vector"]
    model = tiny_model(args)
    stream = random_stream(args, batch=2, steps=8)
    targets = stream["targets"].clone()
    targets[0, :5] = -1
    logits, loss = model(*inputs_between(stream, 0, 8), targets=targets)
    kept = targets != -1
    torch.testing.assert_close(loss, F.cross_entropy(logits[kept], targets[kept]))
    _, full_loss = model(*inputs_between(stream, 0, 8), targets=stream["targets"])
    assert not torch.allclose(loss, full_loss)


def test_flops_count_the_conv_stack():
    image, vector = Imitator(ARGS_BY_KIND["image"]), Imitator(ARGS_BY_KIND["vector"])
    # Nature stack on 2 x 36 x 40 frames: outputs 8x9x32, 3x3x64, 1x1x64
    conv_macs = 8 * 9 * 32 * (2 * 8 * 8) + 3 * 3 * 64 * (32 * 4 * 4) + 1 * 1 * 64 * (64 * 3 * 3)
    assert image.flops_per_step() > 6 * conv_macs > vector.flops_per_step() > 6 * vector.head.weight.numel()


def test_optimizer_decays_only_weights_of_two_or_more_dimensions():
    model = Imitator(ARGS_BY_KIND["image"])
    decay, no_decay = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
