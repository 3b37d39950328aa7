"""One teacher's history and checkpoints in the store, and the protocol that commits them.

Layout, relative to the experiment root (paths from pipeline/layout.py):

    histories/env={env}/teacher={id}/part-{first_step:012d}.parquet   committed shards
    histories/env={env}/teacher={id}/_part-{first_step:012d}.parquet  staged, not yet committed
    histories/env={env}/teacher={id}/_manifest.json                    the commit record
    histories/env={env}/teacher={id}/_teacher.json                     what the teacher is (plan.TeacherSpec)
    teachers/{id}/step={t}/                                            checkpoints

Commit protocol; the manifest is the only commit point:
  1. stage:      each shard is written whole under a hidden name (`_part-…`), which readers skip;
  2. checkpoint: the teacher saves its state to teachers/{id}/step={t}/ at each cutoff it passes
                 and, as the resume point, at the step where the staged shards end;
  3. publish:    the staged shards are renamed to their visible names;
  4. commit:     _manifest.json is replaced atomically, listing the new shards and checkpoints;
  5. tidy:       resume-point checkpoints that the new manifest no longer lists are deleted.
A crash before 4 leaves files that no manifest lists. `recover` deletes exactly those, and the
teacher restarts from the newest listed checkpoint, which always sits where the listed shards end:
the timeline continues with no gap and no duplicate.

A learner of several envs (plan.TeacherSpec.learner) records each env as its own history and
saves one checkpoint, under teachers/{learner}/, that every stream's manifest lists. Each stop
stages every stream's shard and saves the checkpoint before any stream commits; the streams then
commit in order, and only the last one tidies the resume point they shared. A crash between two
streams' commits leaves the later streams one commit behind the first, with their shards
staged: `roll_forward` commits those (collect.recover_learner), so every stream ends where the
checkpoint is.
"""

from __future__ import annotations

import fnmatch
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout
from pipeline.errors import PipelineError
from pipeline.schema import COLUMNS, CheckpointEntry, Manifest, SchemaError, ShardEntry, check_schema
from pipeline.store import Store

MANIFEST = layout.MANIFEST_FILE
# Files this protocol writes into a teacher's folder; recover() never touches anything else.
_OURS = ("part-*.parquet", "_part-*.parquet", ".*.tmp")
# Monotone counters are stored as deltas (a fraction of the bytes and the time of dictionaries);
# row-group statistics only where readers filter (the cutoff filter is on step).
_COUNTERS = ("step", "episode", "episode_step", "policy_version")
_PARQUET_OPTIONS = {
    "compression": "zstd",
    "use_dictionary": [name for name in COLUMNS if name not in _COUNTERS],
    "column_encoding": {name: "DELTA_BINARY_PACKED" for name in _COUNTERS},
    "write_statistics": ["step", "episode", "policy_version"],
}


def _is_ours(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in _OURS)


class HistoryError(PipelineError):
    """Committed history is missing or unreadable; the message names the file."""


def shard_name(first_step: int) -> str:
    return f"part-{first_step:012d}.parquet"


class TeacherHistory:
    def __init__(self, store: Store, experiment: str, env_id: str, teacher_id: str, learner: str = ""):
        """`learner`: whose checkpoints these are when the teacher is a stream of a learner of several envs."""
        self.store, self.experiment, self.teacher_id = store, experiment, teacher_id
        self.dir = layout.history_dir(experiment, env_id, teacher_id)
        self.owner = learner or teacher_id
        self.checkpoints = layout.teacher_checkpoints(self.owner)  # relative to the experiment, as the manifest lists them
        self.checkpoints_dir = f"{experiment}/{self.checkpoints}"

    @classmethod
    def of(cls, store: Store, experiment: str, spec) -> TeacherHistory:
        """The history of a plan.TeacherSpec."""
        return cls(store, experiment, spec.env_id, spec.teacher_id, spec.learner)

    def path(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def checkpoint_entry(self, step: int, cutoff: float | None) -> CheckpointEntry:
        """The checkpoint taken after `step` env steps; its path is relative to the experiment."""
        return CheckpointEntry(step=step, path=layout.teacher_checkpoint(self.owner, step), cutoff=cutoff)

    def checkpoint_path(self, step: int) -> str:
        """Store path of the checkpoint taken after `step` env steps."""
        return f"{self.experiment}/{layout.teacher_checkpoint(self.owner, step)}"

    # --- reading ---

    def read_manifest(self) -> Manifest:
        """The committed manifest; an empty one if this teacher never committed anything."""
        where = self.store.url(self.path(MANIFEST))
        try:
            data = self.store.read_bytes(self.path(MANIFEST))
        except FileNotFoundError:
            return Manifest()
        try:
            return Manifest.from_json(data, where)
        except SchemaError as error:
            raise HistoryError(f"{error}. Nothing was changed; repair or remove it to recollect this teacher.") from error

    def verify(self, manifest: Manifest) -> None:
        """Check every committed shard exists, is readable Parquet of this schema, with the listed rows."""
        for shard in manifest.shards:
            path = self.path(shard.path)
            where = self.store.url(path)
            try:
                with self.store.fs.open(self.store.full(path), "rb") as handle:
                    metadata = pq.ParquetFile(handle).metadata
                check_schema(metadata.schema.to_arrow_schema(), where)
            except FileNotFoundError as error:
                raise HistoryError(f"committed shard {where} is missing. Nothing was deleted.") from error
            except (pa.ArrowException, OSError, SchemaError) as error:
                raise HistoryError(f"committed shard {where} is unreadable ({error}). Nothing was deleted.") from error
            if metadata.num_rows != shard.rows:
                raise HistoryError(f"committed shard {where} has {metadata.num_rows} rows, the manifest lists {shard.rows}. Nothing was deleted.")

    def read(self, manifest: Manifest | None = None) -> pa.Table:
        """All committed rows, in step order."""
        manifest = manifest or self.read_manifest()
        tables = []
        for shard in manifest.shards:
            with self.store.fs.open(self.store.full(self.path(shard.path)), "rb") as handle:
                tables.append(pq.read_table(handle))
        return pa.concat_tables(tables) if tables else pa.table({})

    # --- the commit protocol ---

    def recover(self) -> Manifest:
        """Verify what is committed and delete what a crashed run left uncommitted."""
        manifest = self.read_manifest()
        self.verify(manifest)
        committed = {shard.path for shard in manifest.shards}
        for name in self.store.list_names(self.dir):
            if name not in committed and _is_ours(name):
                self.store.delete(self.path(name))
        listed = {posixpath.basename(c.path) for c in manifest.checkpoints}
        for name in self.store.list_names(self.checkpoints_dir):
            if name.startswith("step=") and name not in listed:
                self.store.delete(f"{self.checkpoints_dir}/{name}")
        return manifest

    def stage(self, table: pa.Table) -> ShardEntry:
        """Write a shard under its hidden name; it is published by the next `commit`."""
        first, last = table["step"][0].as_py(), table["step"][-1].as_py()
        entry = ShardEntry(path=shard_name(first), rows=table.num_rows, first_step=first, last_step=last)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **_PARQUET_OPTIONS)
        self.store.write_bytes(self.path("_" + entry.path), sink.getvalue().to_pybytes())
        return entry

    def commit(self, manifest: Manifest, staged: list[ShardEntry], checkpoints: list[CheckpointEntry], complete: bool,
               tidy: bool = True) -> Manifest:
        """Publish staged shards with the checkpoints saved since the last commit; the newest of them
        must sit where the shards end. Returns the new manifest. `tidy`: delete the resume point it
        replaces (False for all but a learner's last stream: the others still list it)."""
        for entry in staged:
            self.store.rename(self.path("_" + entry.path), self.path(entry.path))
        # Cutoff checkpoints are kept for later stages; a resume point only until the next commit.
        kept = [c for c in manifest.checkpoints if c.cutoff is not None]
        new = Manifest(complete=complete, shards=manifest.shards + staged, checkpoints=kept + checkpoints)
        new.validate(self.store.url(self.path(MANIFEST)))
        self.store.write_bytes(self.path(MANIFEST), new.to_json())
        for old in manifest.checkpoints if tidy else []:
            if old not in new.checkpoints:
                self.store.delete(f"{self.experiment}/{old.path}")
        return new

    def roll_forward(self, manifest: Manifest, first: Manifest) -> Manifest:
        """Commit what `first`, the first stream of this history's learner, committed after
        `manifest` ended: the same shards (staged here before `first` committed) and checkpoints."""
        shards = [s for s in first.shards if s.first_step >= manifest.next_step]
        for shard in shards:
            hidden, visible = self.path("_" + shard.path), self.path(shard.path)
            if not self.store.exists(hidden):
                if not self.store.exists(visible):
                    raise HistoryError(f"{self.store.url(hidden)} is missing: stream {self.teacher_id} cannot catch up with "
                                       f"its learner's first stream at step {first.next_step}. Nothing was deleted.")
                self.store.rename(visible, hidden)  # published before the crash, not listed: commit publishes it again
        checkpoints = [c for c in first.checkpoints if c not in manifest.checkpoints]
        return self.commit(manifest, shards, checkpoints, first.complete)
