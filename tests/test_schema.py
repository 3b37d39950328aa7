import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.schema import (COLUMNS, SCHEMA_VERSION, VERSION_KEY, Manifest, ObsEncoding, SchemaError,
                             Transitions, check_schema)

SPACES = {
    "discrete": gym.spaces.Discrete(81),
    "vector": gym.spaces.Box(-1.0, 1.0, (4,), np.float32),
    "image": gym.spaces.Box(0, 255, (84, 84), np.uint8),
}


def random_transitions(encoding: ObsEncoding, n: int, rng: np.random.Generator) -> Transitions:
    batch = Transitions.empty(n, encoding)
    batch.step[:] = np.arange(100, 100 + n)
    batch.episode[:] = np.arange(n) // 7
    batch.episode_step[:] = np.arange(n) % 7
    batch.action[:] = rng.integers(5, size=n)
    batch.reward[:] = rng.normal(size=n)
    batch.truncated[:] = batch.episode_step == 6
    batch.policy_version[:] = batch.step // 10
    if encoding.kind == "discrete":
        batch.obs[:] = rng.integers(encoding.n, size=n)
    elif encoding.kind == "vector":
        batch.obs[:] = rng.normal(size=batch.obs.shape)
    else:
        batch.obs[:] = rng.integers(256, size=batch.obs.shape)
    return batch


@pytest.mark.parametrize("kind", SPACES)
def test_round_trip_through_parquet(kind, tmp_path):
    encoding = ObsEncoding.for_space(SPACES[kind])
    assert encoding.kind == kind
    batch = random_transitions(encoding, 50, np.random.default_rng(0))
    table = batch.to_table(encoding, teacher_id="t0", env_id="Env-v0", task_id="default", seed=3)
    assert table.column_names == list(COLUMNS)
    pq.write_table(table, tmp_path / "part.parquet")
    back = pq.read_table(tmp_path / "part.parquet")
    assert back.schema.metadata[VERSION_KEY] == str(SCHEMA_VERSION).encode()
    decoded = Transitions.from_table(back, check_schema(back.schema, "part.parquet"))
    for name, column in vars(batch).items():
        np.testing.assert_array_equal(getattr(decoded, name), column, err_msg=name)
    assert back["seed"].to_pylist() == [3] * 50 and set(back["teacher_id"].to_pylist()) == {"t0"}


def test_vector_obs_is_a_fixed_size_float_list_and_images_are_compressed():
    vector = ObsEncoding.for_space(SPACES["vector"])
    assert vector.arrow_type == pa.list_(pa.float32(), 4)
    image = ObsEncoding.for_space(SPACES["image"])
    frames = np.zeros((3, 84, 84), np.uint8)
    assert all(len(b) < 84 * 84 / 10 for b in image.encode(frames).to_pylist())


def test_unsupported_space_is_named():
    with pytest.raises(SchemaError, match="Dict"):
        ObsEncoding.for_space(gym.spaces.Dict({"a": gym.spaces.Discrete(2)}))


def test_check_schema_rejects_other_versions_naming_the_file():
    schema = pa.schema([pa.field(n, pa.int64()) for n in COLUMNS], metadata={VERSION_KEY: b"999"})
    with pytest.raises(SchemaError, match=r"shard-x.parquet: history schema version 999"):
        check_schema(schema, "shard-x.parquet")


def test_manifest_round_trip_and_timeline_checks():
    text = b'''{"complete": false,
      "shards": [{"path": "part-000000000000.parquet", "rows": 10, "first_step": 0, "last_step": 9}],
      "checkpoints": [{"step": 10, "path": "teachers/t/step=10", "cutoff": 0.5}]}'''
    manifest = Manifest.from_json(text, "m.json")
    assert manifest.next_step == 10 and manifest.rows == 10
    assert Manifest.from_json(manifest.to_json(), "m.json") == manifest
    gap = text.replace(b'"first_step": 0', b'"first_step": 1')
    with pytest.raises(SchemaError, match="breaks the timeline"):
        Manifest.from_json(gap, "m.json")
    no_checkpoint = text.replace(b'"step": 10,', b'"step": 5,')
    with pytest.raises(SchemaError, match="no checkpoint at step 10"):
        Manifest.from_json(no_checkpoint, "m.json")
    with pytest.raises(SchemaError, match="m.json: not a valid manifest"):
        Manifest.from_json(b"{not json", "m.json")
