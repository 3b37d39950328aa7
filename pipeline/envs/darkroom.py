"""Dark Room, the grid world of Algorithm Distillation (Laskin et al. 2022, section 5).

An N x N room with an unobserved goal cell. The agent starts in the centre, observes only its own
cell (index = row * N + col), and has 5 actions: stay, up, down, left, right (walls block).
Reward 1 for every step that ends on the goal; the "hard" variant rewards only the first arrival.
Episodes last exactly `episode_len` steps and end truncated (never terminated).
"""

from __future__ import annotations

import gymnasium as gym

# action -> (d_row, d_col): stay, up, down, left, right
MOVES = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))


class DarkRoom(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, size: int = 9, goal: tuple[int, int] | list[int] = (0, 0), episode_len: int = 20, hard: bool = False):
        if size < 2 or episode_len < 1:
            raise ValueError(f"DarkRoom needs size >= 2 and episode_len >= 1, got size={size}, episode_len={episode_len}")
        row, col = (int(v) for v in goal)
        if not (0 <= row < size and 0 <= col < size):
            raise ValueError(f"DarkRoom goal {list(goal)} is outside the {size}x{size} room")
        self.size, self.goal, self.episode_len, self.hard = size, (row, col), episode_len, hard
        self.start = (size // 2, size // 2)
        self.observation_space = gym.spaces.Discrete(size * size)
        self.action_space = gym.spaces.Discrete(len(MOVES))
        self._pos, self._t, self._reached = self.start, 0, False

    def _obs(self) -> int:
        return self._pos[0] * self.size + self._pos[1]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._pos, self._t, self._reached = self.start, 0, False
        return self._obs(), {}

    def step(self, action):
        d_row, d_col = MOVES[int(action)]
        row = min(max(self._pos[0] + d_row, 0), self.size - 1)
        col = min(max(self._pos[1] + d_col, 0), self.size - 1)
        self._pos, self._t = (row, col), self._t + 1
        on_goal = self._pos == self.goal
        reward = float(on_goal and not (self.hard and self._reached))
        self._reached |= on_goal
        return self._obs(), reward, False, self._t >= self.episode_len, {}

    def optimal_return(self) -> float:
        """Best achievable episode return: walk straight to the goal, then stay (hard: 1 if reachable)."""
        distance = abs(self.goal[0] - self.start[0]) + abs(self.goal[1] - self.start[1])
        if distance == 0:
            return float(1 if self.hard else self.episode_len)
        if distance > self.episode_len:
            return 0.0
        return 1.0 if self.hard else float(self.episode_len - distance + 1)
