"""Training windows for the imitator: fixed-length slices of one teacher's history.

A window is `window_steps` consecutive steps of ONE teacher, in the model's token layout
(pipeline/model.py): per step the observation (for frames: a stack of the last `frame_stack`
frames of the episode), the previous step's action and reward, whether the step starts an
episode, and the teacher's action as the target. Windows are cut from the rows of one Ray Data
batch; a window never spans two teachers or a gap in the step counter, so a window that would
cross a batch boundary is simply not made (windows start every `stride` steps, so this loses
at most one window per batch edge).
"""

from __future__ import annotations

import numpy as np

WINDOW_COLUMNS = ("obs", "prev_action", "prev_reward", "first", "action")


def contiguous_runs(teacher: np.ndarray, step: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) row ranges of rows sorted by (teacher, step) where each row continues the last."""
    breaks = np.flatnonzero((teacher[1:] != teacher[:-1]) | (step[1:] != step[:-1] + 1)) + 1
    edges = [0, *breaks.tolist(), len(step)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def stack_frames(frames: np.ndarray, episode_step: np.ndarray, k: int) -> np.ndarray:
    """(N, H, W) frames of one contiguous run -> (N, k, H, W): each row's last k frames of its
    episode, oldest first, the episode's first frame repeated before it starts (as gymnasium's
    FrameStackObservation with padding "reset"). Rows whose episode began before the run reuse
    the run's first frame for the frames they lack; callers start windows after them."""
    index = np.arange(len(frames))[:, None] + np.arange(1 - k, 1)[None, :]  # (N, k)
    episode_start = np.arange(len(frames)) - episode_step
    index = np.maximum(index, np.maximum(episode_start, 0)[:, None])
    return frames[index]


def make_windows(rows: dict[str, np.ndarray], *, window_steps: int, stride: int, n_actions: int,
                 frame_stack: int = 1) -> dict[str, np.ndarray]:
    """Rows of histories (columns teacher_id, step, episode_step, obs, action, reward; obs decoded:
    (N,) int64, (N, d) float32 or (N, H, W) uint8) -> windows, one per row of the output:
    obs (W, T, ...), prev_action (W, T) with n_actions meaning "none: the history starts here",
    prev_reward (W, T), first (W, T), action (W, T)."""
    order = np.lexsort((rows["step"], rows["teacher_id"]))
    teacher, step, episode_step = rows["teacher_id"][order], rows["step"][order], rows["episode_step"][order]
    obs, action, reward = rows["obs"][order], rows["action"][order], rows["reward"][order]
    image = obs.ndim == 3
    lookback = max(1, frame_stack - 1) if image else 1  # rows a window needs before its first step
    out = {name: [] for name in WINDOW_COLUMNS}
    for a, b in contiguous_runs(teacher, step):
        prev_action = np.concatenate([[n_actions], action[a:b - 1]])
        prev_reward = np.concatenate([[0.0], reward[a:b - 1]]).astype(np.float32)
        run_obs = stack_frames(obs[a:b], episode_step[a:b], frame_stack) if image else obs[a:b]
        first_start = 0 if step[a] == 0 else lookback
        for start in range(first_start, b - a - window_steps + 1, stride):
            window = slice(start, start + window_steps)
            out["obs"].append(run_obs[window])
            out["prev_action"].append(prev_action[window])
            out["prev_reward"].append(prev_reward[window])
            out["first"].append(episode_step[a:b][window] == 0)
            out["action"].append(action[a:b][window])
    if not out["action"]:
        return empty_windows(obs, window_steps, frame_stack if image else 0)
    return {name: np.stack(values) for name, values in out.items()}


def empty_windows(obs: np.ndarray, window_steps: int, frame_stack: int) -> dict[str, np.ndarray]:
    """No windows, with the right column types and shapes (Ray Data needs consistent batches)."""
    obs_shape = (frame_stack, *obs.shape[1:]) if frame_stack else obs.shape[1:]
    return {
        "obs": np.zeros((0, window_steps, *obs_shape), obs.dtype),
        "prev_action": np.zeros((0, window_steps), np.int64),
        "prev_reward": np.zeros((0, window_steps), np.float32),
        "first": np.zeros((0, window_steps), bool),
        "action": np.zeros((0, window_steps), np.int64),
    }
