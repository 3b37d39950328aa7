"""The lean PPO teacher (pipeline/teachers/lean_ppo.py): GAE and the clipped objective by hand, one
recorded timeline, save/restore, learning CartPole, a Dark Room smoke run. No Ray."""

import json

import numpy as np
import pytest
import torch

from pipeline.schema import Transitions
from pipeline.teachers import lean_ppo
from pipeline.teachers.lean_ppo import LeanPPOTeacher, clipped_surrogate, gae, numpy_logits
from pipeline.teachers.rllib_config import PPOConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def teacher(env_id="CartPole-v1", env_kwargs=None, seed=0, budget=1000, **config):
    config = {"train_batch_size": 200, "minibatch_size": 50, "num_epochs": 2, **config}
    return LeanPPOTeacher(env_id, env_kwargs or {}, seed=seed, budget=budget, config=PPOConfig(**config))


def test_gae_cuts_at_episode_ends_bootstraps_truncation_and_the_rollout_end():
    gamma, lam = 0.5, 0.5
    rewards = np.array([1, 1, 1, 1, 0], np.float32)
    values = np.array([1, 2, 3, 4, 1], np.float32)
    next_values = np.array([2, 99, 4, 10, 3], np.float32)  # V(obs after step t); step 3's is its final obs
    terminated = np.array([0, 1, 0, 0, 0], bool)
    truncated = np.array([0, 0, 0, 1, 0], bool)
    # by hand, from the end: delta_t = r_t + gamma * (1 - term_t) * V'_t - V_t; A_t = delta_t + gamma lam (1 - done_t) A_{t+1}
    a4 = 0 + 0.5 * 3 - 1  # the rollout ends mid-episode: bootstrap, nothing beyond
    a3 = 1 + 0.5 * 10 - 4  # truncated: bootstraps from its final obs, A_4 belongs to the next episode
    a2 = (1 + 0.5 * 4 - 3) + 0.25 * a3
    a1 = 1 - 2  # terminated: no bootstrap (the 99 is ignored)
    a0 = (1 + 0.5 * 2 - 1) + 0.25 * a1
    np.testing.assert_allclose(gae(rewards, values, next_values, terminated, truncated, gamma, lam), [a0, a1, a2, a3, a4])
    assert [a0, a1, a2, a3, a4] == [0.75, -1, 0.5, 2, 0.5]


def test_clipped_surrogate_by_hand():
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    old_logp = torch.tensor([-1.0, -0.3, -2.0, -0.7])
    logp = (old_logp + ratio.log()).requires_grad_()
    loss = clipped_surrogate(logp, old_logp, advantages, 0.2)
    # per row max(-A rho, -A clip(rho, 0.8, 1.2)): -1.2 (clipped), -0.5, 1.1, 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4)
    loss.backward()
    # clipped rows pass no gradient; the others d(-A rho)/dlogp / 4 = -A rho / 4
    np.testing.assert_allclose(logp.grad.numpy(), [0, -0.5 / 4, 1.1 / 4, 0], rtol=1e-6, atol=1e-7)


def test_rollout_actor_in_numpy_matches_torch():
    for env_id, env_kwargs, obs in (("CartPole-v1", {}, np.array([0.1, -0.2, 0.03, 0.5], np.float32)),
                                    ("DarkRoom-v0", {"goal": [1, 1]}, 17)):
        t = teacher(env_id, env_kwargs)
        with torch.no_grad():
            expected = t.net.actor(t.net.features(t._tensor(obs)[None]))[0].numpy()
        np.testing.assert_allclose(numpy_logits(t.net.numpy_actor(), obs, t.net.cells), expected, rtol=1e-5, atol=1e-6)


def test_rollout_samples_actions_with_the_policys_probabilities():
    t = teacher(train_batch_size=4000, num_epochs=1)
    head = t.net.actor[-1]
    with torch.no_grad():  # pi(right | s) = 0.8 everywhere
        head.weight.zero_()
        head.bias.copy_(torch.log(torch.tensor([0.2, 0.8])))
    batch = t.train_steps(4000)  # one rollout with those weights
    assert abs(batch.action.mean() - 0.8) < 0.02  # 4 standard errors


def test_rows_are_one_timeline_with_policy_version_the_iteration():
    t = teacher(env_kwargs={"max_episode_steps": 30})  # short episodes: truncations inside rollouts
    assert t.granularity == 200 and t.encoding.kind == "vector"
    batches = [t.train_steps(200), t.train_steps(600), t.train_steps(0)]
    batch = Transitions.concat(batches)
    assert len(batch) == t.step == t.iteration * 200 == 800
    np.testing.assert_array_equal(batch.step, np.arange(800))
    np.testing.assert_array_equal(batch.policy_version, np.arange(800) // 200)
    done = batch.terminated | batch.truncated
    assert batch.truncated.any() and (batch.episode_step < 30).all()
    assert (np.diff(batch.episode) == done[:-1]).all()  # a new episode exactly after each done step
    np.testing.assert_array_equal(batch.episode_step[1:][done[:-1]], 0)
    assert (np.diff(batch.episode_step)[~done[:-1]] == 1).all()
    assert batch.episode[0] == 0 and t.episode[0] == batch.episode[-1] + done[-1]
    with pytest.raises(ValueError, match="not a multiple"):
        t.train_steps(300)


def test_advantages_bootstrap_from_the_next_obs_the_final_obs_and_the_obs_after_the_rollout(monkeypatch):
    t = teacher(env_kwargs={"max_episode_steps": 30})  # truncations inside the rollout
    seen, after = {}, []  # what gae was given; the obs each env step returned

    def spy(rewards, values, next_values, terminated, truncated, gamma, lam):
        seen.update(values=values, next_values=next_values)
        return gae(rewards, values, next_values, terminated, truncated, gamma, lam)

    def step(action, env_step=t.envs[0].step):
        out = env_step(action)
        after.append(out[0])
        return out

    monkeypatch.setattr(lean_ppo, "gae", spy)
    monkeypatch.setattr(t.envs[0], "step", step)
    critic = [p.detach().clone() for p in t.net.critic.parameters()]  # the weights the rollout acted with
    batch = t.train_steps(200)
    with torch.no_grad():
        for p, saved in zip(t.net.critic.parameters(), critic):
            p.copy_(saved)
        values = t.net.critic(torch.as_tensor(np.stack(after))).squeeze(1).numpy()
    # next value of row t = V(the obs step t returned): the next row's obs, a truncated episode's final
    # obs (not the next episode's first), the obs the next rollout starts from; unused where terminated
    live = ~batch.terminated
    np.testing.assert_allclose(seen["next_values"][live], values[live], rtol=1e-5, atol=1e-6)
    cut = np.flatnonzero(batch.truncated[:-1])
    assert len(cut) and not np.isclose(batch.obs[cut + 1], np.stack(after)[cut]).all(axis=1).any()


def test_save_restore_continues_weights_optimizer_and_counters(tmp_path):
    first = teacher()
    head = first.train_steps(400)
    first.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state_dicts.pt"]
    assert json.loads((tmp_path / "state.json").read_text())["iteration"] == 2  # plain JSON, no pickle
    second = teacher(seed=7)
    second.restore(str(tmp_path))
    assert (second.step, second.iteration) == (first.step, first.iteration) == (400, 2)
    assert second.rng.bit_generator.state == first.rng.bit_generator.state
    for a, b in zip(first.net.state_dict().values(), second.net.state_dict().values()):
        assert torch.equal(a, b)
    one, two = first.optimizer.state_dict(), second.optimizer.state_dict()
    assert one["param_groups"] == two["param_groups"]
    for key, state in one["state"].items():
        assert all(torch.equal(value, two["state"][key][name]) for name, value in state.items())
    observations = head.obs[::37]
    assert [first.act(o) for o in observations] == [second.act(o) for o in observations]
    tail = second.train_steps(200)
    np.testing.assert_array_equal(tail.step, np.arange(400, 600))
    assert (tail.policy_version == 2).all() and second.iteration == 3
    cut = not (head.terminated[-1] or head.truncated[-1])
    assert tail.episode[0] == head.episode[-1] + 1 and tail.episode_step[0] == 0 and cut == (first.episode_step[0] > 0)


def test_learns_cartpole():
    t = teacher(seed=0, train_batch_size=2000, minibatch_size=128, num_epochs=10)
    batch = t.train_steps(20_000)
    ends = np.flatnonzero(batch.terminated | batch.truncated)
    returns = np.diff(ends, prepend=-1)  # CartPole pays 1 per step: a return is an episode's length
    assert returns[:10].mean() < 40 and returns[-10:].mean() > 80, returns[-10:]
    assert np.std([t.act(o) for o in batch.obs[-200:]]) > 0  # the greedy policy uses both actions


def test_dark_room_records_cell_indices_and_images_are_refused():
    t = teacher("DarkRoom-v0", {"goal": [1, 1]})
    batch = t.train_steps(400)
    assert t.encoding.kind == "discrete" and batch.obs.dtype == np.int64
    assert batch.obs.min() >= 0 and batch.obs.max() < 81
    assert (batch.obs[batch.episode_step == 0] == 40).all()  # every episode starts in the centre
    assert 0 <= t.act(int(batch.obs[-1])) < 5
    with pytest.raises(ValueError, match="vector or discrete observations"):
        teacher("ALE/Breakout-v5")


def test_cuda_is_refused_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        LeanPPOTeacher("CartPole-v1", {}, seed=0, budget=400, config=PPOConfig(), device="cuda")


def test_a_learner_of_several_envs_records_one_timeline_per_stream_with_its_versions(tmp_path):
    t = teacher(env_kwargs={"max_episode_steps": 30}, train_batch_size=600, num_envs=3)  # 200 steps per stream
    assert t.granularity == 200
    with pytest.raises(ValueError, match="train_streams"):
        t.train_steps(200)
    streams = t.train_streams(400)
    assert len(streams) == 3 and t.step == 400 and t.iteration == 2
    for k, batch in enumerate(streams):
        np.testing.assert_array_equal(batch.step, np.arange(400))
        np.testing.assert_array_equal(batch.policy_version, np.arange(400) // 200)  # the one learner's versions
        done = batch.terminated | batch.truncated
        assert (np.diff(batch.episode) == done[:-1]).all() and batch.episode[0] == 0
        assert t.episode[k] == batch.episode[-1] + done[-1]
    assert not np.array_equal(streams[0].obs, streams[1].obs)  # each env its own episodes
    t.save(str(tmp_path))
    again = teacher(env_kwargs={"max_episode_steps": 30}, train_batch_size=600, num_envs=3, seed=9)
    again.restore(str(tmp_path))
    for before, after in zip(streams, again.train_streams(200)):
        np.testing.assert_array_equal(after.step, np.arange(400, 600))
        assert after.episode[0] == before.episode[-1] + 1 and after.episode_step[0] == 0  # a new episode per stream
        assert (after.policy_version == 2).all()
    with pytest.raises(ValueError, match="3 streams"):
        teacher(train_batch_size=600, num_envs=2).restore(str(tmp_path))


def test_num_envs_must_divide_the_rollout():
    with pytest.raises(ValueError, match="multiple of num_envs"):
        PPOConfig(train_batch_size=500, num_envs=3)
