"""The project's own PPO teacher: one env, an actor and a critic MLP, plain PyTorch, every acted step recorded.

A lean alternative to RLlib's `ppo` (pipeline.teachers.rllib) with the same typed config
(PPOConfig) and the same recorded history, following CleanRL's ppo.py for one env (bench/peer_ppo.py
is that single file; bench/lean_ppo.py times and compares the two). The algorithm, in textbook
terms (Schulman et al. 2017, "Proximal Policy Optimization"; Schulman et al. 2016, "GAE"):

  network   two separate MLPs of `hidden` with tanh: the actor pi(a|s) (softmax over linear logits)
            and the critic V(s); orthogonal initialisation (gain sqrt(2), the actor's last layer
            0.01, the critic's 1). Discrete observations enter as one-hot vectors of their cell.
  rollout   each iteration acts `train_batch_size` env steps with a_t ~ pi_old(.|s_t), the weights
            fixed for the whole rollout (so it is one policy_version: the number of iterations
            completed before it); an episode that ends is reset at once and the rollout goes on.
  GAE       delta_t = r_t + gamma * (1 - terminated_t) * V(s'_t) - V(s_t), where s'_t is the obs
            after step t (the final obs of a truncated episode: truncation bootstraps, termination
            does not; for the rollout's last step, the obs the next rollout starts from), and
            A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}, done = terminated or truncated,
            A = 0 beyond the rollout. Value targets R_t = A_t + V(s_t).
  update    `num_epochs` passes over the rollout, each in a fresh random order, cut into minibatches
            of `minibatch_size` (the last one shorter when it does not divide train_batch_size). Per
            minibatch, advantages normalised to mean 0 and std 1 (A - mean) / (std + 1e-8), then
            one Adam step (lr constant, eps 1e-5) on
                L = L_clip + 0.5 * L_V - entropy_coeff * H
                L_clip = mean(max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))),
                         rho = pi(a|s) / pi_old(a|s), eps = clip_param
                L_V = 0.5 * mean((V(s) - R)^2)        (unclipped squared error)
                H = mean entropy of pi(.|s)
            with the gradient's global norm clipped to 0.5 (CleanRL's max_grad_norm).
No learning-rate annealing (PPOConfig has no schedule; CleanRL anneals by default), no value-loss
clipping, no KL early stop. `budget` is accepted and unused.

The rollout samples through a numpy copy of the actor made at the start of each iteration (a
single obs through torch costs more than the env step); the old log-probabilities and the values
are then computed in one batched torch pass, which is the same thing since the weights do not
change during a rollout.

Recorded as RLlib's teacher records: the cell index for discrete observations, the vector itself
otherwise; images are rejected (PPOConfig.check_spaces). The device is chosen at run time, as
lean_dqn's: a GPU when torch sees one (in a Ray actor, only when the actor asked for one), else the
CPU; `device="cuda"` where torch sees none is refused.

save/restore use no pickle: the actor, critic and Adam state dicts (torch.load with
weights_only=True); step, episode and iteration counters and the numpy RNG state (plain ints) as
JSON. The env cannot be saved mid-episode: a restored teacher starts a new episode at its next
step (the history's episode counter moves on by one; the cut episode has no done flag, and its
last rollout already bootstrapped from the obs it stopped at). Weights, optimizer, counters,
iteration count and RNG continue.
"""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.envs import make_env
from pipeline.schema import ObsEncoding, Transitions
from pipeline.teachers.rllib_config import PPOConfig
from pipeline.teachers.torch_checkpoint import load_checkpoint, resumed_episode, save_checkpoint



# --- the update rules, as functions the tests check by hand ---


def gae(rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray, terminated: np.ndarray,
        truncated: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """GAE(lambda) advantages of one rollout (all arrays (N,)); next_values[t] = V(obs after step t),
    the final obs of an episode that ended there (ignored where terminated)."""
    delta = rewards + gamma * np.where(terminated, 0.0, next_values) - values
    carry = gamma * lam * ~(terminated | truncated)
    advantages = np.zeros(len(rewards), np.float64)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = delta[t] + carry[t] * running
        advantages[t] = running
    return advantages.astype(np.float32)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's clipped policy loss: mean(max(-A * rho, -A * clip(rho, 1 - clip, 1 + clip)))."""
    ratio = torch.exp(logp - old_logp)
    return torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()


# --- the networks ---


def layer(n_in: int, n_out: int, gain: float) -> nn.Linear:
    linear = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(linear.weight, gain)
    nn.init.zeros_(linear.bias)
    return linear


def mlp(sizes: list[int], out_gain: float) -> nn.Sequential:
    """Linear layers with tanh between them; orthogonal init, gain sqrt(2) but `out_gain` for the last."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        last = i == len(sizes) - 2
        layers.append(layer(sizes[i], sizes[i + 1], out_gain if last else math.sqrt(2)))
        if not last:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    def __init__(self, encoding: ObsEncoding, actions: int, hidden: list[int]):
        super().__init__()
        self.cells = encoding.n if encoding.kind == "discrete" else 0
        inputs = self.cells or encoding.shape[0]
        self.actor = mlp([inputs, *hidden, actions], 0.01)
        self.critic = mlp([inputs, *hidden, 1], 1.0)

    def features(self, obs: torch.Tensor) -> torch.Tensor:  # recorded obs -> network input
        return F.one_hot(obs, self.cells).float() if self.cells else obs.float()

    def numpy_actor(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(weight, bias) per linear layer of the actor, as numpy copies, for the rollout."""
        return [(m.weight.detach().cpu().numpy().copy(), m.bias.detach().cpu().numpy().copy())
                for m in self.actor if isinstance(m, nn.Linear)]


def numpy_logits(weights: list[tuple[np.ndarray, np.ndarray]], obs, cells: int) -> np.ndarray:
    """The actor's logits for one recorded obs, in numpy (a discrete obs picks a column of the first layer)."""
    (w, b), rest = weights[0], weights[1:]
    x = w[:, obs] + b if cells else w @ obs + b
    for w, b in rest:
        x = w @ np.tanh(x) + b
    return x


# --- the teacher ---


class LeanPPOTeacher:
    """The Teacher API (pipeline.teachers) over the PPO of this module's docstring; with
    `num_envs` K > 1, one learner over K envs (streams), each recorded as its own timeline."""

    def __init__(self, env_id: str, env_kwargs: dict, *, seed: int, budget: int, config: PPOConfig,
                 device: str | None = None):
        self.envs = [make_env(env_id, **env_kwargs) for _ in range(config.num_envs)]
        config.check_spaces(env_id, self.envs[0].observation_space, self.envs[0].action_space)
        self.encoding = ObsEncoding.for_space(self.envs[0].observation_space)
        self.config, self.budget, self.granularity = config, budget, config.granularity
        self.streams = config.num_envs
        self.actions = int(self.envs[0].action_space.n)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
        # Seeded by the seed and the task, as the other teachers: other tasks' teachers explore differently.
        self.rng = np.random.default_rng([seed, zlib.crc32(json.dumps(env_kwargs, sort_keys=True).encode())])
        with torch.random.fork_rng(devices=[]):  # leave the caller's torch RNG as it was
            torch.manual_seed(int(self.rng.integers(2**31)))
            self.net = ActorCritic(self.encoding, self.actions, list(config.hidden)).to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr, eps=1e-5)
        self.step, self.iteration = 0, 0  # env steps per stream; iterations completed
        self.episode, self.episode_step = [0] * self.streams, [0] * self.streams  # per stream
        self.obs = [None] * self.streams  # the obs each stream's next step acts at; None: it starts a new episode

    def train_steps(self, n: int) -> Transitions:
        """One stream's teacher API: learn for n env steps, return the transitions acted in."""
        if self.streams > 1:
            raise ValueError(f"this learner steps {self.streams} envs: call train_streams")
        return self.train_streams(n)[0]

    def train_streams(self, n: int) -> list[Transitions]:
        """Learn for n env steps in each stream; return each stream's transitions, in stream order."""
        if n % self.granularity:
            raise ValueError(f"this teacher trains in iterations of {self.granularity} env steps; {n} is not a multiple")
        iterations = [self._iteration() for _ in range(n // self.granularity)]
        if not iterations:
            return [Transitions.empty(0, self.encoding) for _ in range(self.streams)]
        return [Transitions.concat(list(stream)) for stream in zip(*iterations)]

    def _iteration(self) -> list[Transitions]:
        """Act one rollout in each stream with the current weights, record them, then update on them."""
        for k, obs in enumerate(self.obs):
            if obs is None:
                self.obs[k] = self.envs[k].reset(seed=int(self.rng.integers(2**31)))[0]
        weights = self.net.numpy_actor()
        u = self.rng.random((self.granularity, self.streams))  # one uniform per step picks the action by inverse CDF
        # The weights do not change during a rollout, so the streams can be stepped one after another.
        rollouts = [self._rollout(k, weights, u[:, k]) for k in range(self.streams)]
        self.step += self.granularity
        self._update(rollouts)
        self.iteration += 1
        return [batch for batch, _ in rollouts]

    def _rollout(self, k: int, weights, u: np.ndarray) -> tuple[Transitions, dict[int, np.ndarray]]:
        """Stream k's rollout: its transitions, and row -> final obs of each truncated episode."""
        n, env, cells = self.granularity, self.envs[k], self.net.cells
        batch = Transitions.empty(n, self.encoding)
        final: dict[int, np.ndarray] = {}
        obs = self.obs[k]
        for i in range(n):
            logits = numpy_logits(weights, obs, cells)
            cdf = np.cumsum(np.exp(logits - logits.max()))
            action = min(int(np.searchsorted(cdf, u[i] * cdf[-1], side="right")), self.actions - 1)
            batch.obs[i], batch.action[i] = obs, action
            obs, reward, terminated, truncated, _ = env.step(action)
            batch.reward[i] = reward
            if terminated or truncated:
                batch.terminated[i], batch.truncated[i] = terminated, truncated
                if truncated and not terminated:
                    final[i] = obs
                obs = env.reset()[0]
        batch.number_steps(self.step, self.episode[k], self.episode_step[k])
        batch.policy_version[:] = self.iteration
        ended = bool(batch.terminated[-1] or batch.truncated[-1])
        self.episode[k] = int(batch.episode[-1]) + ended
        self.episode_step[k] = 0 if ended else int(batch.episode_step[-1]) + 1
        self.obs[k] = obs
        return batch, final

    def _tensor(self, obs) -> torch.Tensor:
        return torch.as_tensor(np.asarray(obs, self.encoding.numpy_dtype), device=self.device)

    def _advantages(self, batch: Transitions, values: np.ndarray, final: dict[int, np.ndarray], next_obs) -> np.ndarray:
        """GAE of one stream's rollout, (T,), given V(s_t) (T,); V of each step's next obs computed here."""
        net, n = self.net, len(batch)
        after = [batch.obs[1:], np.asarray(next_obs, self.encoding.numpy_dtype)[None]]
        if final:
            after.append(np.stack(list(final.values())))
        with torch.no_grad():
            after_values = net.critic(net.features(self._tensor(np.concatenate(after)))).squeeze(1).cpu().numpy()
        next_values = after_values[:n].copy()
        next_values[list(final)] = after_values[n:]
        return gae(batch.reward, values, next_values, batch.terminated, batch.truncated, self.config.gamma,
                   self.config.gae_lambda)

    def _update(self, rollouts: list[tuple[Transitions, dict[int, np.ndarray]]]) -> None:
        c, net = self.config, self.net
        obs = net.features(self._tensor(np.concatenate([batch.obs for batch, _ in rollouts])))  # (K * T, ...)
        actions = torch.as_tensor(np.concatenate([batch.action for batch, _ in rollouts]), device=self.device)
        with torch.no_grad():
            old_logp = torch.distributions.Categorical(logits=net.actor(obs)).log_prob(actions)
            values = net.critic(obs).squeeze(1)  # (K * T,)
        per_stream = values.cpu().numpy().reshape(self.streams, self.granularity)
        advantages = np.concatenate([self._advantages(batch, v, final, next_obs)
                                     for (batch, final), v, next_obs in zip(rollouts, per_stream, self.obs)])
        advantages = torch.as_tensor(advantages, device=self.device)
        returns = advantages + values
        n = len(actions)
        for _ in range(c.num_epochs):
            order = torch.as_tensor(self.rng.permutation(n), device=self.device)
            for start in range(0, n, c.minibatch_size):
                idx = order[start:start + c.minibatch_size]
                dist = torch.distributions.Categorical(logits=net.actor(obs[idx]))
                adv = advantages[idx]
                if len(idx) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                policy_loss = clipped_surrogate(dist.log_prob(actions[idx]), old_logp[idx], adv, c.clip_param)
                value_loss = 0.5 * ((net.critic(obs[idx]).squeeze(1) - returns[idx]) ** 2).mean()
                loss = policy_loss + 0.5 * value_loss - c.entropy_coeff * dist.entropy().mean()
                self.optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), 0.5)
                self.optimizer.step()

    def act(self, obs, first: bool = False) -> int:
        """Greedy (argmax) action of the current weights for one recorded-style observation."""
        with torch.no_grad():
            return int(self.net.actor(self.net.features(self._tensor(obs)[None])).argmax())

    def close(self) -> None:
        for env in self.envs:
            env.close()

    # checkpoints, without pickle

    def save(self, directory: str) -> None:
        single = self.streams == 1  # one stream keeps the single-teacher state layout
        state = {"step": self.step, "iteration": self.iteration, "rng": self.rng.bit_generator.state,
                 "episode": self.episode[0] if single else self.episode,
                 "episode_step": self.episode_step[0] if single else self.episode_step}
        save_checkpoint(directory, {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}, state)

    def restore(self, directory: str) -> None:
        state_dicts, state = load_checkpoint(directory, self.device)
        self.net.load_state_dict(state_dicts["net"])
        self.optimizer.load_state_dict(state_dicts["optimizer"])
        self.step, self.iteration = state["step"], state["iteration"]
        streams = zip(np.atleast_1d(state["episode"]).tolist(), np.atleast_1d(state["episode_step"]).tolist(), strict=True)
        resumed = [resumed_episode({"episode": episode, "episode_step": step}) for episode, step in streams]
        if len(resumed) != self.streams:
            raise ValueError(f"{directory}: a checkpoint of {len(resumed)} streams, this learner has {self.streams}")
        self.episode, self.episode_step = [e for e, _ in resumed], [s for _, s in resumed]
        self.rng.bit_generator.state = state["rng"]
        self.obs = [None] * self.streams
