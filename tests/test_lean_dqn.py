"""The lean DQN teacher (pipeline/teachers/lean_dqn.py): textbook semantics on hand-made cases,
one recorded timeline, save/restore, learning CartPole, Dark Room and Breakout smoke runs. No Ray."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.config import load_preset
from pipeline.schema import ObsEncoding, Transitions
from pipeline.teachers import algo_config, make_teacher
from pipeline.teachers.lean_dqn import QNetwork, Replay, n_step_returns, td_targets


def teacher(budget=1000, env_id="CartPole-v1", env_kwargs=None, seed=0, **config):
    return make_teacher("lean_dqn", env_id, env_kwargs or {}, seed=seed, budget=budget, config=config)


def weights(net):
    return [p.detach().clone() for p in net.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_epsilon_and_lr_fall_linearly_over_their_share_of_the_budget():
    t = teacher(budget=1000, epsilon_start=1.0, epsilon_end=0.1, epsilon_decay=0.5, lr=1e-3, lr_end=1e-4)
    np.testing.assert_allclose(t.epsilon(np.array([0, 250, 500, 900])), [1.0, 0.55, 0.1, 0.1])
    assert t.lr(0) == pytest.approx(1e-3) and t.lr(500) == pytest.approx(5.5e-4) and t.lr(2000) == pytest.approx(1e-4)
    assert teacher(lr=1e-3).lr(500) == 1e-3  # no lr_end: constant


def test_n_step_returns_stop_at_episode_ends_and_bootstrap_with_gamma_to_the_k():
    gamma = 0.5
    rewards = np.array([[1, 2, 4], [1, 2, 4], [1, 2, 4]], np.float32)
    terminated = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], bool)
    ended = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0]], bool)  # row 2: truncated after its first step
    returns, discount, horizon = n_step_returns(rewards, terminated, ended, gamma)
    np.testing.assert_allclose(returns, [1 + 0.5 * 2 + 0.25 * 4, 1 + 0.5 * 2, 1])
    np.testing.assert_allclose(discount, [0.125, 0.0, 0.5])  # terminated: no bootstrap; truncated: gamma^1
    np.testing.assert_array_equal(horizon, [3, 2, 1])


def test_double_q_target_values_the_online_nets_choice_with_the_target_net():
    returns, discount = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
    online, target = torch.tensor([[1.0, 3.0], [2.0, 0.0]]), torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    torch.testing.assert_close(td_targets(returns, discount, online, target, double_q=True), torch.tensor([1 + 0.5 * 20, 2.0]))
    torch.testing.assert_close(td_targets(returns, discount, None, target, double_q=False), torch.tensor([1 + 0.5 * 20, 2.0]))
    discount = torch.tensor([0.5, 0.25])
    torch.testing.assert_close(td_targets(returns, discount, online, target, double_q=True), torch.tensor([11.0, 2 + 0.25 * 30]))
    torch.testing.assert_close(td_targets(returns, discount, online, target, double_q=False), torch.tensor([11.0, 2 + 0.25 * 40]))


def test_replay_bootstraps_from_the_final_obs_and_stacks_frames_within_an_episode():
    replay = Replay(100, ObsEncoding("image", (1, 1)), frame_stack=3, n_step=2)
    frame = lambda v: np.full((1, 1), v, np.uint8)  # noqa: E731
    replay.begin(frame(10))
    replay.add(0, 1.0, False, False, frame(11))
    replay.add(1, 2.0, False, True, frame(12))  # truncated: 12 is the final obs, in its own slot
    replay.begin(frame(20))
    replay.add(2, 3.0, True, False, frame(21))  # terminated
    replay.begin(frame(30))
    replay.add(3, 4.0, False, False, frame(31))
    assert replay.head == 6 and list(np.flatnonzero(replay.valid)) == [0, 1, 3, 5]
    returns, discount, bootstrap = replay.n_steps(np.array([0, 1, 3]), gamma=0.5)
    np.testing.assert_allclose(returns, [1 + 0.5 * 2, 2, 3])
    np.testing.assert_allclose(discount, [0.25, 0.5, 0.0])
    np.testing.assert_array_equal(bootstrap, [2, 2, 4])
    stacks = replay.stacked(np.array([0, 2, 3, 6]))[..., 0, 0]  # (N, k)
    np.testing.assert_array_equal(stacks, [[10, 10, 10], [10, 11, 12], [20, 20, 20], [30, 30, 31]])
    rng = np.random.default_rng(0)
    assert set(replay.sample(rng, 200)) == {0, 1, 3}  # acted steps with both of their n steps stored
    single = Replay(10, ObsEncoding("image", (2, 2)), frame_stack=1, n_step=1)
    single.begin(np.zeros((2, 2), np.uint8))
    assert single.stacked(np.array([0])).shape == (1, 1, 2, 2)  # one channel for the conv stack


@pytest.mark.parametrize("batch, ratio, fragment, per_step", [(16, 4, 64, 0.25), (128, 12.8, 10, 0.1), (16, 32, 64, 2)])
def test_updates_replay_ratio_transitions_per_env_step_from_learning_starts(batch, ratio, fragment, per_step):
    t = teacher(budget=400, learning_starts=40, train_batch_size=batch, replay_ratio=ratio, rollout_fragment_length=fragment,
                hidden=[8], buffer_size=1000)
    counts = []
    for _ in range(10):
        t.train_steps(40)
        counts.append(t.updates)
    assert counts[0] == 1  # the first at learning_starts
    np.testing.assert_allclose(np.diff(counts), 40 * per_step)  # ratio / batch updates per env step after it
    assert t.optimizer.state_dict()["state"][0]["step"].item() == t.updates


def test_target_network_changes_only_at_multiples_of_target_update_steps():
    for tau in (1.0, 0.5):
        t = teacher(learning_starts=10, train_batch_size=8, replay_ratio=8, rollout_fragment_length=8, target_update_steps=25,
                    target_update_tau=tau, hidden=[8])
        before, changed = weights(t.target), []
        for step in range(1, 101):
            t.train_steps(1)
            after = weights(t.target)
            if not same(before, after):
                changed.append(step)
                if tau == 1.0:
                    assert same(after, weights(t.q))
            before = after
        assert changed == [25, 50, 75, 100], tau


def test_rows_form_one_timeline_with_the_updates_made_before_each_action():
    t = teacher(budget=600, learning_starts=50, train_batch_size=16, replay_ratio=4, hidden=[8])
    batch = Transitions.concat([t.train_steps(n) for n in (1, 37, 0, 162, 400)])
    np.testing.assert_array_equal(batch.step, np.arange(600))
    done = batch.terminated | batch.truncated
    assert (np.diff(batch.episode) == done[:-1]).all() and batch.episode[0] == 0
    starts = np.flatnonzero(np.r_[True, done[:-1]])
    assert (batch.episode_step[starts] == 0).all() and (np.diff(batch.episode_step)[~done[:-1]] == 1).all()
    np.testing.assert_array_equal(batch.policy_version, [t.updates_scheduled(s) for s in range(600)])
    assert batch.obs.shape == (600, 4) and batch.obs.dtype == np.float32
    assert t.step == 600 and t.episode == batch.episode[-1] + done[-1]


@pytest.mark.parametrize("keep_buffer", [True, False])
def test_save_restore_continues_weights_updates_buffer_and_schedule(tmp_path, keep_buffer):
    config = dict(budget=1000, learning_starts=64, train_batch_size=16, replay_ratio=4, hidden=[16],
                  checkpoint_replay_buffer=keep_buffer, n_step=3)
    first = teacher(seed=0, **config)
    head = first.train_steps(500)
    first.save(str(tmp_path))
    second = teacher(seed=7, **config)  # another seed: everything must come from the checkpoint
    second.restore(str(tmp_path))
    assert (second.step, second.updates) == (first.step, first.updates) == (500, first.updates_scheduled(500))
    assert same(weights(second.q), weights(first.q)) and same(weights(second.target), weights(first.target))
    assert second.rng.bit_generator.state == first.rng.bit_generator.state
    if keep_buffer:
        assert second.replay.head == first.replay.head
        for name in Replay.ARRAYS:
            np.testing.assert_array_equal(getattr(second.replay, name), getattr(first.replay, name), err_msg=name)
    else:
        assert second.replay.head == 0
    observations = head.obs[::37]
    assert [first.act(o) for o in observations] == [second.act(o) for o in observations]
    first.restore(str(tmp_path))  # the same checkpoint continued twice gives the same timeline
    tails = [t.train_steps(300) for t in (first, second)]
    for name in ("step", "episode", "episode_step", "obs", "action", "reward", "policy_version"):
        np.testing.assert_array_equal(getattr(tails[0], name), getattr(tails[1], name), err_msg=name)
    assert same(weights(first.q), weights(second.q))
    np.testing.assert_array_equal(tails[0].step, np.arange(500, 800))
    assert tails[0].episode[0] == head.episode[-1] + 1 and tails[0].episode_step[0] == 0  # a new episode
    assert tails[0].policy_version[0] == first.updates_scheduled(500) and first.updates == first.updates_scheduled(800)


def test_learns_cartpole_with_the_quick_presets_config():
    torch.set_num_threads(1)
    group = load_preset("quick").collect.teachers["cartpole"]
    assert algo_config("lean_dqn", group.algo_config).dueling  # the quick preset's network: dueling, 3-step, double Q
    t = make_teacher("lean_dqn", group.env, {}, seed=0, budget=group.budget, config=group.algo_config)
    batch = t.train_steps(5000)
    returns = np.bincount(batch.episode, weights=batch.reward)[:-1]  # complete episodes
    assert returns[:10].mean() < 40 and returns[-10:].mean() > 80, (returns[:10].mean(), returns[-10:].mean())


def test_dark_room_records_cell_indices():
    t = teacher(budget=300, env_id="DarkRoom-v0", env_kwargs={"goal": [1, 1]}, learning_starts=32, train_batch_size=16,
                replay_ratio=4)
    batch = t.train_steps(300)
    assert batch.obs.dtype == np.int64 and batch.obs.min() >= 0 and batch.obs.max() < 81
    assert (batch.obs[batch.episode_step == 0] == 40).all()  # every episode starts in the centre
    assert t.updates == t.updates_scheduled(300) > 0
    assert 0 <= t.act(int(batch.obs[-1])) < 5


def test_breakout_smoke_records_single_frames_and_learns_from_stacks():
    config = replace(algo_config("dqn", load_preset("atari").collect.teachers["breakout"].algo_config),
                     learning_starts=64, buffer_size=400, hidden=[32])
    t = make_teacher("lean_dqn", "ALE/Breakout-v5", {"full_action_space": True}, seed=0, budget=300, config=vars(config))
    batch = t.train_steps(300)
    assert batch.obs.shape == (300, 84, 84) and batch.obs.dtype == np.uint8 and t.encoding.kind == "image"
    assert batch.obs.std() > 0 and len({frame.tobytes() for frame in batch.obs[:64]}) > 1
    assert set(batch.action) <= set(range(18)) and t.updates == t.updates_scheduled(300) > 0
    assert t.replay.current().shape == (1, 4, 84, 84)
    assert 0 <= t.act(batch.obs[0], first=True) < 18 and 0 <= t.act(batch.obs[1]) < 18


def test_dueling_q_is_value_plus_centred_advantage_and_greedy_is_its_argmax():
    config = algo_config("lean_dqn", {"dueling": True, "hidden": [8]})
    net = QNetwork(ObsEncoding("vector", (4,)), 3, config)
    obs = torch.randn(50, 4)
    h = net.body(obs)
    advantage = net.advantage(h)
    torch.testing.assert_close(net(obs), net.value(h) + advantage - advantage.mean(1, keepdim=True))
    torch.testing.assert_close(net.greedy(obs), net(obs).argmax(1))


@pytest.mark.parametrize("env_id, env_kwargs, dueling", [("CartPole-v1", {}, True), ("CartPole-v1", {}, False),
                                                          ("DarkRoom-v0", {"size": 5}, True)])
def test_numpy_greedy_acts_as_the_torch_network_after_updates_and_a_restore(tmp_path, env_id, env_kwargs, dueling):
    t = teacher(budget=400, env_id=env_id, env_kwargs=env_kwargs, dueling=dueling, hidden=[32, 16],
                learning_starts=32, train_batch_size=32)
    assert t._numpy_greedy is not None  # CPU, not images

    def agree(obs):  # obs: (N, *obs)
        with torch.inference_mode():
            expected = t.q.greedy(torch.as_tensor(obs)).tolist()
        assert [t._greedy(o[None]) for o in obs] == expected

    encoding = t.encoding
    sample = (np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32) if encoding.kind == "vector"
              else np.arange(encoding.n))
    agree(sample)
    t.train_steps(300)  # the optimizer changed the weights in place: the numpy views follow
    assert t.updates > 0
    agree(sample)
    t.save(str(tmp_path))
    other = teacher(budget=400, env_id=env_id, env_kwargs=env_kwargs, dueling=dueling, hidden=[32, 16], seed=1)
    other.restore(str(tmp_path))
    assert [other._greedy(o[None]) for o in sample] == [t._greedy(o[None]) for o in sample]
