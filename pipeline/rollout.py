"""A frozen imitator acting: many envs in lockstep, one KV cache, greedy or sampled actions.

    policy = ImitatorPolicy(load_imitator(checkpoint_dir), batch_size=len(envs), temperature=1.0)
    actions = policy.act(observations, first)   # first[i]: env i has just been reset
    policy.observe(rewards)                     # what the envs returned for those actions

The policy feeds the model the same token stream it was trained on (pipeline/model.py): each
step's observation with the previous step's action and reward, across episode boundaries, so
the context carries what happened in earlier episodes. `prime` feeds recorded steps (a teacher's
last steps before a cutoff) through the cache first.
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
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.action: torch.Tensor | None = None

    def _obs_tensor(self, obs: np.ndarray, first: torch.Tensor) -> torch.Tensor:
        obs = torch.as_tensor(obs, device=self.device)
        if self.args.obs_kind != "image":
            return obs.float() if self.args.obs_kind == "vector" else obs.long()
        if self.frames is None:
            self.frames = obs.unsqueeze(1).repeat(1, self.args.frame_stack, 1, 1)
        stacked = torch.cat([self.frames[:, 1:], obs.unsqueeze(1)], dim=1)
        reset = obs.unsqueeze(1).expand_as(stacked)  # a new episode starts with its first frame repeated
        self.frames = torch.where(first[:, None, None, None], reset, stacked)
        return self.frames

    @torch.no_grad()
    def _feed(self, obs: np.ndarray, first: np.ndarray) -> torch.Tensor:
        first = torch.as_tensor(first, dtype=torch.bool, device=self.device)
        return self.model.step(self.cache, self._obs_tensor(obs, first), self.prev_action, self.prev_reward, first)

    def act(self, obs: np.ndarray, first: np.ndarray) -> np.ndarray:
        """Actions for observations (B, ...) of the B envs; call observe() with the rewards next."""
        logits = self._feed(obs, first)
        self.action = sample_actions(logits, self.temperature, self.generator)
        return self.action.cpu().numpy()

    def observe(self, reward: np.ndarray) -> None:
        self.prev_action = self.action
        self.prev_reward = torch.as_tensor(reward, dtype=torch.float32, device=self.device)

    def prime(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, first: np.ndarray) -> None:
        """Feed T recorded steps (arrays (T, ...), the same for every env) through the cache, as
        if the policy had taken the recorded actions."""
        batch = self.prev_action.shape[0]
        for t in range(len(action)):
            self._feed(np.repeat(obs[t][None], batch, axis=0), np.full(batch, first[t]))
            self.action = torch.full((batch,), int(action[t]), dtype=torch.long, device=self.device)
            self.observe(np.full(batch, reward[t], np.float32))
