"""Checkpoints of the lean PyTorch teachers (lean_dqn, lean_ppo), without pickle: nothing read
from a store can run code. Weights and optimizer states go through torch.save and come back with
torch.load(weights_only=True); counters and RNG states are JSON.

    save_checkpoint(directory, {"q": q.state_dict(), "optimizer": ...}, {"step": 100, ...})
    state_dicts, state = load_checkpoint(directory, device)
    episode, episode_step = resumed_episode(state)
"""

from __future__ import annotations

import json
import os

import torch

STATE_DICTS_FILE, STATE_FILE = "state_dicts.pt", "state.json"


def save_checkpoint(directory: str, state_dicts: dict, state: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    torch.save(state_dicts, os.path.join(directory, STATE_DICTS_FILE))
    with open(os.path.join(directory, STATE_FILE), "w") as handle:
        json.dump(state, handle)


def load_checkpoint(directory: str, device: torch.device) -> tuple[dict, dict]:
    state_dicts = torch.load(os.path.join(directory, STATE_DICTS_FILE), map_location=device, weights_only=True)
    with open(os.path.join(directory, STATE_FILE)) as handle:
        return state_dicts, json.load(handle)


def resumed_episode(state: dict) -> tuple[int, int]:
    """(episode, episode_step) after a restore: an env cannot be restored mid-episode, so a teacher
    saved mid-episode goes on with a new one."""
    return state["episode"] + int(state["episode_step"] > 0), 0
