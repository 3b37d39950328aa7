"""A frozen imitator acting: many envs in lockstep, one KV cache, greedy or sampled actions.

    policy = ImitatorPolicy(load_imitator(checkpoint_dir), batch_size=len(envs), temperature=1.0)
    actions = policy.act(observations, first)   # first[i]: env i has just been reset
    policy.observe(rewards)                     # what the envs returned for those actions

The policy feeds the model the same token stream it was trained on (pipeline/model.py): each
step's observation with the previous step's action and reward, across episode boundaries, so
the context carries what happened in earlier episodes. `prime` feeds recorded steps (a teacher's
last steps before a cutoff) through the cache first, each env its own, of any length.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.model import Imitator, sample_actions


class ImitatorPolicy:
    def __init__(self, model: Imitator, batch_size: int, temperature: float, seed: int = 0):
        self.model, self.args = model.eval(), model.args
        self.device = next(model.parameters()).device
        self.temperature = temperature
        self.cache = model.init_cache(batch_size, self.device)
        self.prev_action = torch.full((batch_size,), self.args.n_actions, dtype=torch.long, device=self.device)
        self.prev_reward = torch.zeros(batch_size, device=self.device)
        self.frames: torch.Tensor | None = None  # (B, frame_stack, H, W) for image observations
        self.started = torch.zeros(batch_size, dtype=torch.bool, device=self.device)  # env has fed a step of its own
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.action: torch.Tensor | None = None

    def _obs_tensor(self, obs: np.ndarray, first: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        obs = torch.as_tensor(obs, device=self.device)
        if self.args.obs_kind != "image":
            return obs.float() if self.args.obs_kind == "vector" else obs.long()
        if self.frames is None:
            self.frames = obs.unsqueeze(1).repeat(1, self.args.frame_stack, 1, 1)
        stacked = torch.cat([self.frames[:, 1:], obs.unsqueeze(1)], dim=1)
        # A new episode, or an env's first step after padding, starts with its first frame repeated.
        reset = first | ~self.started
        self.frames = torch.where(reset[:, None, None, None], obs.unsqueeze(1).expand_as(stacked), stacked)
        self.started |= True if real is None else real
        return self.frames

    @torch.no_grad()
    def _feed(self, obs: np.ndarray, first: np.ndarray, real: torch.Tensor | None = None) -> torch.Tensor:
        first = torch.as_tensor(first, dtype=torch.bool, device=self.device)
        return self.model.step(self.cache, self._obs_tensor(obs, first, real), self.prev_action, self.prev_reward, first, real)

    def act(self, obs: np.ndarray, first: np.ndarray) -> np.ndarray:
        """Actions for observations (B, ...) of the B envs; call observe() with the rewards next."""
        logits = self._feed(obs, first)
        self.action = sample_actions(logits, self.temperature, self.generator)
        return self.action.cpu().numpy()

    def observe(self, reward: np.ndarray) -> None:
        self.prev_action = self.action
        self.prev_reward = torch.as_tensor(reward, dtype=torch.float32, device=self.device)

    def prime(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, first: np.ndarray,
              lengths: np.ndarray | None = None) -> None:
        """Feed each env's recorded steps through the cache, as if it had taken the recorded actions.
        Arrays are per env, (B, T, ...) (left_padded() builds them); env i's steps are the last
        lengths[i] of its row (None: all T). The entries before them are padding, fed in lockstep
        as tokens no later token attends to (Imitator.step's `real`), so each env's context holds
        exactly its own steps and its stream starts with "no previous step", as it would alone."""
        batch, steps = action.shape
        lengths = np.full(batch, steps) if lengths is None else np.asarray(lengths)
        real = np.arange(steps)[None, :] >= (steps - lengths)[:, None]  # (B, T)
        none = torch.full((batch,), self.args.n_actions, dtype=torch.long, device=self.device)
        for t in range(steps):
            real_t = torch.as_tensor(real[:, t], device=self.device)
            self._feed(obs[:, t], first[:, t], None if real[:, t].all() else real_t)
            self.action = torch.where(real_t, torch.as_tensor(action[:, t], dtype=torch.long, device=self.device), none)
            self.observe(np.where(real[:, t], reward[:, t], 0).astype(np.float32))


def left_padded(steps: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]):
    """Per-env recorded steps (obs, action, reward, first), each array (T_i, ...), as prime()'s
    arguments: (B, T, ...) arrays, T = max T_i, each env's steps at the end of its row, and lengths."""
    lengths = np.array([len(action) for _, action, _, _ in steps])
    width = int(lengths.max(initial=0))

    def pad(arrays: list[np.ndarray]) -> np.ndarray:
        shape, dtype = next(((a.shape[1:], a.dtype) for a in arrays if len(a)), ((), np.float32))
        out = np.zeros((len(arrays), width, *shape), dtype)
        for row, array in zip(out, arrays):
            if len(array):
                row[width - len(array):] = array
        return out

    return (*(pad([s[k] for s in steps]) for k in range(4)), lengths)
