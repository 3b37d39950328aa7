"""RLlib teachers (DQN, PPO, new API stack) that record every transition they sample.

Recording: the algorithm samples through RecordingEnvRunner, a SingleAgentEnvRunner whose
sample() turns the episode chunks it returns into rows (the obs each action was taken at, the
action as the env received it, reward, done flags, and WEIGHTS_SEQ_NO: the version of the weights
that acted). Evaluation episodes never pass through it. A teacher is one local env runner with
one env (num_env_runners=0, num_envs_per_env_runner=1), so the rows form one sequential history,
and each algo.train() samples exactly `granularity` env steps.

What RLlib's default models need, and what is recorded instead:
  discrete obs  -> one-hot float vectors for the network; the cell index is recorded
  84x84 frames  -> the last `frame_stack` frames, channels last, for the network (scaled to
                   [0, 1] inside it, so replay keeps bytes); only the newest frame is recorded
"""

from __future__ import annotations

import os
import pickle
from collections import deque

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.dqn import DQNConfig as RLlibDQNConfig
from ray.rllib.algorithms.dqn.torch.default_dqn_torch_rl_module import DefaultDQNTorchRLModule
from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from pipeline.envs import make_env
from pipeline.schema import ObsEncoding, Transitions
from pipeline.teachers.rllib_config import DQNConfig, PPOConfig, is_image

STATE_FILE = "teacher.pkl"


# --- the env as the network sees it ---


def network_view(env: gym.Env, frame_stack: int) -> gym.Env:
    space = env.observation_space
    if isinstance(space, gym.spaces.Discrete):
        return gym.wrappers.DtypeObservation(gym.wrappers.FlattenObservation(env), np.float32)
    if is_image(space) and frame_stack > 1:
        stacked = gym.wrappers.FrameStackObservation(env, frame_stack)  # (k, 84, 84), first frame repeated at reset
        channels_last = gym.spaces.Box(0, 255, (*space.shape, frame_stack), np.uint8)
        return gym.wrappers.TransformObservation(stacked, lambda obs: np.moveaxis(obs, 0, -1), channels_last)
    return env


def recorded_obs(network_obs: np.ndarray, space: gym.Space) -> np.ndarray:
    """(N, *network obs shape) -> (N, *recorded obs shape): undo network_view for the history."""
    if isinstance(space, gym.spaces.Discrete):
        return network_obs.argmax(-1)
    if is_image(space) and network_obs.ndim == 4:
        return network_obs[..., -1]
    return network_obs


class TeacherEnv(gym.Wrapper):
    """What RLlib builds from env_config: make_env(env_id, **env_kwargs) seen through network_view."""

    def __init__(self, config: dict):
        super().__init__(network_view(make_env(config["env_id"], **config["env_kwargs"]), config["frame_stack"]))


# --- recording ---


class EpisodeRecorder:
    """Turns the episode chunks of successive samples into one numbered timeline of Transitions."""

    def __init__(self, space: gym.Space):
        self.space, self.encoding = space, ObsEncoding.for_space(space)
        self.step, self.next_episode = 0, 0  # global step of the next row; index of the next new episode
        self.ongoing: dict[str, int] = {}  # RLlib episode id -> our episode index
        self.pending: list[Transitions] = []

    def add(self, chunks) -> None:
        for chunk in chunks:
            n = len(chunk)
            if n == 0:
                continue
            if chunk.id_ not in self.ongoing:
                self.ongoing[chunk.id_], self.next_episode = self.next_episode, self.next_episode + 1
            episode = self.ongoing.pop(chunk.id_) if chunk.is_done else self.ongoing[chunk.id_]
            done = np.zeros(n, bool)
            batch = Transitions(
                step=np.arange(self.step, self.step + n),
                episode=np.full(n, episode),
                episode_step=np.arange(chunk.t_started, chunk.t_started + n),
                obs=recorded_obs(np.asarray(chunk.get_observations(slice(0, n))), self.space),
                action=np.asarray(chunk.get_actions(), np.int64),
                reward=np.asarray(chunk.get_rewards(), np.float32),
                terminated=done.copy(),
                truncated=done.copy(),
                policy_version=np.asarray(chunk.get_extra_model_outputs(WEIGHTS_SEQ_NO), np.int64).reshape(n),
            )
            batch.terminated[-1], batch.truncated[-1] = chunk.is_terminated, chunk.is_truncated
            self.pending.append(batch)
            self.step += n

    def take(self) -> list[Transitions]:
        taken, self.pending = self.pending, []
        return taken

    def get_state(self) -> dict:
        # Episodes in progress end with the process: a restored env runner starts new ones.
        return {"step": self.step, "next_episode": self.next_episode}

    def set_state(self, state: dict) -> None:
        self.step, self.next_episode, self.ongoing, self.pending = state["step"], state["next_episode"], {}, []


class RecordingEnvRunner(SingleAgentEnvRunner):
    def __init__(self, *, config, **kwargs):
        super().__init__(config=config, **kwargs)
        env_config = config.env_config
        self.recorder = EpisodeRecorder(make_env(env_config["env_id"], **env_config["env_kwargs"]).observation_space)

    def sample(self, **kwargs):
        episodes = super().sample(**kwargs)
        self.recorder.add(episodes)
        return episodes


class FrameDQNModule(DefaultDQNTorchRLModule):
    """RLlib's DQN module for uint8 frames: scales them to [0, 1] before the conv stack."""

    def _qf_forward_helper(self, batch, encoder, head):
        obs = batch[Columns.OBS]
        if obs.dtype == torch.uint8:
            batch = {**batch, Columns.OBS: obs.float() / 255.0}
        return super()._qf_forward_helper(batch, encoder, head)


class ClipRewards(ConnectorV2):
    """Learner connector: the loss sees rewards clipped to [-1, 1]. It edits the episodes the replay
    buffer sampled for this update (fresh copies), never the buffer or the recorded history."""

    def __call__(self, *, rl_module, batch, episodes, **kwargs):
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            episode.set_rewards(new_data=np.clip(np.asarray(episode.get_rewards(), np.float32), -1.0, 1.0))
        return batch


# --- the teacher ---


def rllib_config(config: DQNConfig | PPOConfig, env_id: str, env_kwargs: dict, *, seed: int, budget: int):
    """The RLlib AlgorithmConfig of a teacher."""
    space = make_env(env_id, **env_kwargs).observation_space
    frames = is_image(space)
    model = DefaultModelConfig(
        fcnet_hiddens=list(config.hidden), fcnet_activation="relu", head_fcnet_hiddens=[],
        conv_filters=[list(f) for f in config.conv_filters] if frames else None,
    )
    if isinstance(config, DQNConfig):
        lr = config.lr if config.lr_end is None else [[0, config.lr], [budget, config.lr_end]]
        algo = RLlibDQNConfig().training(
            lr=lr, gamma=config.gamma, tau=config.target_update_tau, train_batch_size_per_learner=config.train_batch_size,
            training_intensity=config.replay_ratio, num_steps_sampled_before_learning_starts=config.learning_starts,
            target_network_update_freq=config.target_update_steps, n_step=config.n_step,
            double_q=config.double_q, dueling=config.dueling,
            replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": config.buffer_size},
            epsilon=[(0, config.epsilon_start), (max(1, round(config.epsilon_decay * budget)), config.epsilon_end)],
        )
        if frames:
            algo = algo.rl_module(rl_module_spec=RLModuleSpec(module_class=FrameDQNModule))
        if config.clip_rewards:
            algo = algo.training(learner_connector=lambda observation_space, action_space: ClipRewards())
        fragment, frame_stack = config.rollout_fragment_length, config.frame_stack
    else:
        algo = RLlibPPOConfig().training(
            lr=config.lr, gamma=config.gamma, lambda_=config.gae_lambda,
            train_batch_size_per_learner=config.train_batch_size, minibatch_size=config.minibatch_size,
            num_epochs=config.num_epochs, clip_param=config.clip_param, entropy_coeff=config.entropy_coeff,
        )
        fragment, frame_stack = config.train_batch_size, 1
    return (
        algo.environment(TeacherEnv, env_config={"env_id": env_id, "env_kwargs": env_kwargs, "frame_stack": frame_stack})
        .env_runners(num_env_runners=0, num_envs_per_env_runner=1, rollout_fragment_length=fragment,
                     env_runner_cls=RecordingEnvRunner)
        .learners(num_learners=0)
        .rl_module(model_config=model)
        .reporting(min_sample_timesteps_per_iteration=0, min_time_s_per_iteration=None)
        .debugging(seed=seed)
    )


class RLlibTeacher:
    """The Teacher API (pipeline.teachers) over an RLlib Algorithm."""

    def __init__(self, env_id: str, env_kwargs: dict, *, seed: int, budget: int, config: DQNConfig | PPOConfig):
        self.config, self.granularity = config, config.granularity
        self.algo = rllib_config(config, env_id, env_kwargs, seed=seed, budget=budget).build_algo()
        self.runner: RecordingEnvRunner = self.algo.env_runner
        self.encoding = self.runner.recorder.encoding
        self.space = self.runner.recorder.space
        self.frame_stack = config.frame_stack if isinstance(config, DQNConfig) and is_image(self.space) else 1
        self._frames: deque | None = None

    @property
    def step(self) -> int:
        return self.runner.recorder.step

    def train_steps(self, n: int) -> Transitions:
        if n % self.granularity:
            raise ValueError(f"this teacher trains in iterations of {self.granularity} env steps; {n} is not a multiple")
        target = self.step + n
        while self.step < target:
            self.algo.train()
        batch = Transitions.concat(self.runner.recorder.take())
        if len(batch) != n:
            raise RuntimeError(f"RLlib sampled {len(batch)} env steps where {n} were asked for")
        return batch

    def save(self, directory: str) -> None:
        self.algo.save_to_path(os.path.abspath(os.path.join(directory, "algorithm")))
        buffer = self.algo.local_replay_buffer
        keep_buffer = buffer is not None and getattr(self.config, "checkpoint_replay_buffer", False)
        state = {"recorder": self.runner.recorder.get_state(), "replay_buffer": buffer.get_state() if keep_buffer else None}
        with open(os.path.join(directory, STATE_FILE), "wb") as handle:
            pickle.dump(state, handle, protocol=pickle.HIGHEST_PROTOCOL)

    def restore(self, directory: str) -> None:
        self.algo.restore_from_path(os.path.abspath(os.path.join(directory, "algorithm")))
        with open(os.path.join(directory, STATE_FILE), "rb") as handle:
            state = pickle.load(handle)
        self.runner.recorder.set_state(state["recorder"])
        if state["replay_buffer"] is not None:
            self.algo.local_replay_buffer.set_state(state["replay_buffer"])

    def close(self) -> None:
        self.algo.stop()

    def act(self, obs, first: bool = False) -> int:
        """Greedy action of the current weights for one recorded-style observation; `first` marks
        the first observation of an episode (it restarts the frame stack)."""
        if isinstance(self.space, gym.spaces.Discrete):
            obs = np.eye(self.space.n, dtype=np.float32)[obs]
        elif self.frame_stack > 1:  # as FrameStackObservation: the first frame repeated at an episode's start
            if first or self._frames is None:
                self._frames = deque([obs] * self.frame_stack, maxlen=self.frame_stack)
            else:
                self._frames.append(obs)
            obs = np.stack(self._frames, axis=-1)
        module = self.algo.get_module()
        with torch.no_grad():
            out = module.forward_inference({Columns.OBS: torch.as_tensor(np.asarray(obs)[None])})
        if Columns.ACTIONS in out:
            return int(out[Columns.ACTIONS][0])
        return int(out[Columns.ACTION_DIST_INPUTS][0].argmax())
