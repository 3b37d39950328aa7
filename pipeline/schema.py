"""The history contract: column names and types, observation encodings, schema version, manifest.

One row is one transition a teacher acted in. Later stages, external readers and checks rely on
these names (docs/design.md, "Storage layout"). They are defined here; the modules that read a
few columns by name (train's READ_COLUMNS, evaluate's priming, the report's teacher curves) use
the same strings, so renaming a column is a change of SCHEMA_VERSION.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field, fields

import gymnasium as gym
import numpy as np
import pyarrow as pa

from pipeline.errors import PipelineError

SCHEMA_VERSION = 1
VERSION_KEY = b"cutoff.schema_version"
OBS_KEY = b"cutoff.obs_encoding"

# Constant within one teacher's history.
IDENTITY_COLUMNS = {
    "teacher_id": pa.string(),
    "env_id": pa.string(),
    "task_id": pa.string(),
    "seed": pa.int64(),
}
# Filled by the teacher as it acts; `obs` has the type of the env's ObsEncoding.
STEP_COLUMNS = {
    "step": pa.int64(),  # global env step in the teacher's life, 0..T-1, contiguous
    "episode": pa.int64(),  # episode index in the teacher's life
    "episode_step": pa.int64(),  # step within the episode, from 0
    "obs": None,
    "action": pa.int64(),
    "reward": pa.float32(),
    "terminated": pa.bool_(),
    "truncated": pa.bool_(),
    "policy_version": pa.int64(),  # train iteration / weights version when it acted
}
COLUMNS = tuple(IDENTITY_COLUMNS) + tuple(STEP_COLUMNS)


class SchemaError(PipelineError, ValueError):
    """A shard or manifest does not follow this module's contract."""


@dataclass(frozen=True)
class ObsEncoding:
    """How an env's observations are stored in the `obs` column.

    discrete: int64 index.  vector: fixed-size list of float32.  image: zlib-compressed
    uint8 bytes per row, `shape` giving the frame shape (H, W) or (H, W, C).
    """

    kind: str
    shape: tuple[int, ...] = ()
    n: int = 0  # number of values of a discrete space

    @classmethod
    def for_space(cls, space: gym.Space) -> ObsEncoding:
        if isinstance(space, gym.spaces.Discrete) and space.start == 0:
            return cls("discrete", (), int(space.n))
        if isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) in (2, 3):
            return cls("image", tuple(space.shape))
        if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
            return cls("vector", tuple(space.shape))
        raise SchemaError(
            f"observation space {space} is not supported: expected Discrete(n), "
            "a 1-D Box, or a uint8 image Box"
        )

    @property
    def arrow_type(self) -> pa.DataType:
        return {
            "discrete": pa.int64(),
            "vector": pa.list_(pa.float32(), self.shape[0] if self.shape else 0),
            "image": pa.binary(),
        }[self.kind]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype({"discrete": np.int64, "vector": np.float32, "image": np.uint8}[self.kind])

    def encode(self, obs: np.ndarray) -> pa.Array:
        """(N, *shape) array -> Arrow array of N rows."""
        if self.kind == "discrete":
            return pa.array(np.asarray(obs, np.int64))
        if self.kind == "vector":
            flat = pa.array(np.asarray(obs, np.float32).reshape(-1))
            return pa.FixedSizeListArray.from_arrays(flat, self.shape[0])
        frames = np.ascontiguousarray(obs, np.uint8)
        return pa.array([zlib.compress(frame.tobytes(), 1) for frame in frames], pa.binary())

    def decode(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Arrow column -> (N, *shape) numpy array."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if self.kind == "discrete":
            return column.to_numpy()
        if self.kind == "vector":
            return column.flatten().to_numpy().reshape(-1, self.shape[0])
        frames = [np.frombuffer(zlib.decompress(b), np.uint8) for b in column.to_pylist()]
        return np.stack(frames).reshape(-1, *self.shape) if frames else np.zeros((0, *self.shape), np.uint8)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "shape": list(self.shape), "n": self.n})

    @classmethod
    def from_json(cls, text: str | bytes) -> ObsEncoding:
        data = json.loads(text)
        return cls(data["kind"], tuple(data["shape"]), data["n"])


def history_schema(encoding: ObsEncoding) -> pa.Schema:
    types = {**IDENTITY_COLUMNS, **STEP_COLUMNS, "obs": encoding.arrow_type}
    return pa.schema(
        [pa.field(name, types[name], nullable=False) for name in COLUMNS],
        metadata={VERSION_KEY: str(SCHEMA_VERSION).encode(), OBS_KEY: encoding.to_json().encode()},
    )


def check_schema(schema: pa.Schema, where: str) -> ObsEncoding:
    """Raise SchemaError naming `where` unless `schema` is a history schema of this version."""
    metadata = schema.metadata or {}
    version = metadata.get(VERSION_KEY, b"<none>").decode()
    if version != str(SCHEMA_VERSION):
        raise SchemaError(f"{where}: history schema version {version}, this code reads version {SCHEMA_VERSION}")
    missing = [name for name in COLUMNS if name not in schema.names]
    if missing:
        raise SchemaError(f"{where}: missing history columns {missing}")
    return ObsEncoding.from_json(metadata[OBS_KEY])


@dataclass
class Transitions:
    """Consecutive transitions of one teacher, one numpy array per step column (length N)."""

    step: np.ndarray  # (N,) int64
    episode: np.ndarray  # (N,) int64
    episode_step: np.ndarray  # (N,) int64
    obs: np.ndarray  # (N, *obs_shape)
    action: np.ndarray  # (N,) int64
    reward: np.ndarray  # (N,) float32
    terminated: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool
    policy_version: np.ndarray  # (N,) int64

    @classmethod
    def empty(cls, n: int, encoding: ObsEncoding) -> Transitions:
        """Preallocated columns for a teacher to fill in place."""
        ints = lambda: np.zeros(n, np.int64)  # noqa: E731
        return cls(
            step=ints(),
            episode=ints(),
            episode_step=ints(),
            obs=np.zeros((n, *encoding.shape), encoding.numpy_dtype),
            action=ints(),
            reward=np.zeros(n, np.float32),
            terminated=np.zeros(n, bool),
            truncated=np.zeros(n, bool),
            policy_version=ints(),
        )

    def __len__(self) -> int:
        return len(self.step)

    @classmethod
    def concat(cls, batches: list[Transitions]) -> Transitions:
        return cls(**{f.name: np.concatenate([getattr(b, f.name) for b in batches]) for f in fields(cls)})

    def number_steps(self, first_step: int, episode: int, episode_step: int) -> None:
        """Fill step, episode and episode_step from the done flags, given the counters at row 0."""
        n = len(self)
        self.step[:] = np.arange(first_step, first_step + n)
        begins = np.zeros(n, bool)
        begins[1:] = (self.terminated | self.truncated)[:-1]
        self.episode[:] = episode + np.cumsum(begins)
        index = np.arange(n)
        self.episode_step[:] = index - np.maximum.accumulate(np.where(begins, index, 0))
        self.episode_step[self.episode == episode] += episode_step

    def to_table(self, encoding: ObsEncoding, *, teacher_id: str, env_id: str, task_id: str, seed: int) -> pa.Table:
        zeros = pa.array(np.zeros(len(self), np.int32))
        identity = [pa.array([value]).take(zeros) for value in (teacher_id, env_id, task_id, seed)]
        steps = [encoding.encode(self.obs) if name == "obs" else pa.array(getattr(self, name)) for name in STEP_COLUMNS]
        schema = history_schema(encoding)
        return pa.Table.from_arrays([a.cast(f.type) for a, f in zip(identity + steps, schema)], schema=schema)

    @classmethod
    def from_table(cls, table: pa.Table, encoding: ObsEncoding) -> Transitions:
        return cls(
            **{
                f.name: encoding.decode(table["obs"]) if f.name == "obs" else table[f.name].to_numpy()
                for f in fields(cls)
            }
        )


# --- Manifest: {"complete": bool, "shards": [{"path", "rows", "first_step", "last_step"}, ...]} ---
# plus "checkpoints": the teacher checkpoints committed with those shards (see history.py).


@dataclass
class ShardEntry:
    path: str  # file name, relative to the teacher's history folder
    rows: int
    first_step: int
    last_step: int


@dataclass
class CheckpointEntry:
    step: int  # the teacher has taken exactly `step` env steps when this was saved
    path: str  # relative to the experiment root, e.g. teachers/{id}/step={t}
    cutoff: float | None = None  # the cutoff fraction it was saved for; None for a resume point


@dataclass
class Manifest:
    complete: bool = False
    shards: list[ShardEntry] = field(default_factory=list)
    checkpoints: list[CheckpointEntry] = field(default_factory=list)

    @property
    def next_step(self) -> int:
        return self.shards[-1].last_step + 1 if self.shards else 0

    @property
    def rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, text: bytes | str, where: str) -> Manifest:
        try:
            data = json.loads(text)
            manifest = cls(
                complete=bool(data["complete"]),
                shards=[ShardEntry(**s) for s in data["shards"]],
                checkpoints=[CheckpointEntry(**c) for c in data.get("checkpoints", [])],
            )
        except (ValueError, KeyError, TypeError) as error:
            raise SchemaError(f"{where}: not a valid manifest ({error})") from error
        manifest.validate(where)
        return manifest

    def validate(self, where: str) -> None:
        """Shards contiguous from step 0; the newest checkpoint sits exactly where the shards end."""
        expected_first = 0
        for shard in self.shards:
            if shard.first_step != expected_first or shard.rows != shard.last_step - shard.first_step + 1:
                raise SchemaError(f"{where}: shard {shard.path} breaks the timeline at step {expected_first}")
            expected_first = shard.last_step + 1
        steps = [c.step for c in self.checkpoints]
        if steps != sorted(set(steps)):
            raise SchemaError(f"{where}: checkpoint steps {steps} are not increasing")
        if self.shards and (not self.checkpoints or self.checkpoints[-1].step != self.next_step):
            raise SchemaError(f"{where}: no checkpoint at step {self.next_step}, where the committed shards end")
