"""Environments: registers the project's own envs and ALE's with Gymnasium on import."""

import ale_py
import gymnasium as gym

gym.register_envs(ale_py)

for _id, _kwargs in (("DarkRoom-v0", {}), ("DarkRoomHard-v0", {"hard": True})):
    if _id not in gym.registry:
        gym.register(_id, entry_point="pipeline.envs.darkroom:DarkRoom", kwargs=_kwargs)
