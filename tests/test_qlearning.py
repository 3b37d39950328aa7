import numpy as np
import pytest

from pipeline.envs.darkroom import DarkRoom
from pipeline.teachers import make_teacher

GOAL = [1, 7]
BUDGET = 20_000


def teacher(seed=0, budget=BUDGET, **config):
    return make_teacher("qlearning", "DarkRoom-v0", {"goal": GOAL}, seed=seed, budget=budget, config=config)


def episode_returns(batch):
    return np.bincount(batch.episode, weights=batch.reward)


def test_return_rises_from_random_to_near_optimal():
    batch = teacher().train_steps(BUDGET)
    returns = episode_returns(batch)
    optimal = DarkRoom(goal=GOAL).optimal_return()
    first, last = returns[:100].mean(), returns[-100:].mean()
    assert first < 0.2 * optimal, first
    assert last > 0.85 * optimal, (last, optimal)
    # still learning in the middle: the curve rises between cutoffs, not only at the start
    quarters = [returns[i * 250:(i + 1) * 250].mean() for i in range(4)]
    assert quarters == sorted(quarters), quarters


FAST = dict(learning_rate=1.0, epsilon_start=0.05, epsilon_end=0.05, initial_q=1.0, backward_replay=True)


def test_optimism_and_backward_replay_learn_within_a_few_dozen_episodes():
    # The quick preset's Dark Room teacher: optimistic values, lr 1 (the room is deterministic), little
    # epsilon, each episode replayed backwards. It improves with what it has tried, not on an epsilon
    # schedule, and fast; without the backward replay the same learner is slower.
    returns = [episode_returns(teacher(seed=s, budget=1000, **FAST).train_steps(1000)) for s in range(5)]
    slower = [episode_returns(teacher(seed=s, budget=1000, **{**FAST, "backward_replay": False}).train_steps(1000))
              for s in range(5)]
    optimal = DarkRoom(goal=GOAL).optimal_return()
    assert np.mean([r[:5] for r in returns]) < 0.5 * optimal
    assert np.mean([r[-20:] for r in returns]) > 0.7 * optimal  # epsilon 0.05 still costs some steps
    assert np.mean([r[:30] for r in returns]) > np.mean([r[:30] for r in slower])


def test_transitions_form_one_timeline():
    batch = teacher(budget=500).train_steps(500)
    np.testing.assert_array_equal(batch.step, np.arange(500))
    assert (batch.episode_step == np.arange(500) % 20).all() and (batch.episode == np.arange(500) // 20).all()
    assert batch.truncated.sum() == 25 and not batch.terminated.any()
    np.testing.assert_array_equal(batch.policy_version, batch.step)  # one TD update per step


@pytest.mark.parametrize("config", [{}, FAST], ids=["plain", "backward-replay"])
def test_restored_teacher_continues_the_identical_timeline(tmp_path, config):
    whole = teacher(seed=3, budget=3000, **config).train_steps(3000)
    first = teacher(seed=3, budget=3000, **config)
    head = first.train_steps(1234)  # mid-episode: the episode's steps to replay are in the checkpoint
    first.save(str(tmp_path))
    second = teacher(seed=99, budget=3000, **config)  # another seed: everything must come from the checkpoint
    second.restore(str(tmp_path))
    assert second.step == 1234
    tail_a, tail_b = second.train_steps(1000), second.train_steps(766)
    for name in ("step", "episode", "episode_step", "obs", "action", "reward", "truncated"):
        joined = np.concatenate([getattr(head, name), getattr(tail_a, name), getattr(tail_b, name)])
        np.testing.assert_array_equal(joined, getattr(whole, name), err_msg=name)


def test_act_is_the_greedy_policy_of_a_trained_snapshot():
    trained = teacher()
    trained.train_steps(BUDGET)
    env = DarkRoom(goal=GOAL)
    obs, _ = env.reset()
    total = 0.0
    for _ in range(20):
        obs, reward, *_ = env.step(trained.act(obs))
        total += reward
    assert total == env.optimal_return()


def test_needs_discrete_spaces():
    with pytest.raises(ValueError, match="qlearning needs discrete observations"):
        make_teacher("qlearning", "CartPole-v1", {}, seed=0, budget=10, config={})
