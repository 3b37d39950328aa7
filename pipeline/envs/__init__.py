"""Environments: registers the project's own envs and ALE's with Gymnasium, and builds them.

    env = make_env("ALE/Breakout-v5", full_action_space=True)   # 84x84 uint8 frames

Every teacher and check builds its env through make_env, so all see the same observations.
"""

import ale_py
import gymnasium as gym

gym.register_envs(ale_py)
ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner for every env made

for _id, _kwargs in (("DarkRoom-v0", {}), ("DarkRoomHard-v0", {"hard": True})):
    if _id not in gym.registry:
        gym.register(_id, entry_point="pipeline.envs.darkroom:DarkRoom", kwargs=_kwargs)
# CartPole-v1 with a pole twice as long (slower to fall, harder to catch once tilted): a transfer target.
if "CartPoleLongPole-v0" not in gym.registry:
    gym.register("CartPoleLongPole-v0", entry_point="pipeline.envs.cartpole:CartPoleVariant", kwargs={"length": 1.0},
                 max_episode_steps=500, reward_threshold=475.0)


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/")


def make_env(env_id: str, **kwargs) -> gym.Env:
    """gym.make, plus the standard Atari preprocessing for ALE ids: ALE v5's sticky actions
    (repeat_action_probability 0.25 unless kwargs say otherwise), frame skip 4 with max-pooling
    of the last two frames, 84x84 grayscale uint8 frames, up to 30 no-op starts. Frames are not
    stacked here: a teacher that needs a stack builds it from consecutive frames."""
    if not is_atari(env_id):
        return gym.make(env_id, **kwargs)
    env = gym.make(env_id, frameskip=1, **kwargs)  # AtariPreprocessing does the skipping
    return gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84, grayscale_obs=True)
