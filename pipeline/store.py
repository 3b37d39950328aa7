"""One URI-driven object store over fsspec: local paths (the default), s3:// via s3fs, and the rest.

    store = Store("s3://bucket/prefix")       # endpoint from AWS_ENDPOINT_URL, credentials
    store.write_bytes("exp/a.json", b"{}")     # from the standard AWS variables or the cloud role
    pyarrow.dataset.dataset(store.full("exp/histories"), filesystem=store.arrow_fs)

Paths given to a Store are relative to its root. Credentials never pass through this module:
a Store pickles as its URI and resolves them again in whichever process unpickles it.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from functools import cached_property

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import BadInput

# Several processes write one prefix, so no cached listings; and no cached instances, so a
# Store made after the AWS variables change uses the new ones.
_S3_OPTIONS = {"use_listings_cache": False, "skip_instance_cache": True}
_OPTIONS_BY_PROTOCOL = {"s3": _S3_OPTIONS, "s3a": _S3_OPTIONS}


class StoreError(BadInput):
    """The store cannot be used, or a path would leave it; the message names the URI and the reason."""


class Store:
    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/") or "/"
        protocol = fsspec.utils.get_protocol(self.uri)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri, **_OPTIONS_BY_PROTOCOL.get(protocol, {}))
        except (ImportError, ValueError) as error:
            raise StoreError(f"store {self.uri!r}: unsupported URI ({error})") from error
        if self.is_local:  # absolute, so that processes with another working directory (Tune trials) find it
            self.uri = self.root

    def __reduce__(self):
        return Store, (self.uri,)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def full(self, path: str = "") -> str:
        """Filesystem path (no protocol) of `path`, for fsspec, pyarrow or Ray Data. A path that
        would leave the store (absolute, or with a '..' segment) is refused."""
        if path.startswith("/") or ".." in path.split("/"):
            raise StoreError(f"path {path!r} would leave the store {self.uri!r}")
        return posixpath.join(self.root, path) if path else self.root

    def url(self, path: str = "") -> str:
        """URI of `path` as a person would type it, for messages."""
        return self.fs.unstrip_protocol(self.full(path)) if not self.is_local else self.full(path)

    @cached_property
    def arrow_fs(self) -> pafs.FileSystem:
        """The same store as a pyarrow filesystem (pyarrow.dataset, pyarrow.parquet, Ray Data)."""
        if self.is_local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    # --- reads ---

    def exists(self, path: str) -> bool:
        return self.fs.exists(self.full(path))

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(self.full(path))

    def read_many(self, paths: list[str]) -> dict[str, bytes]:
        """Read several small files at once (concurrently on object stores); missing ones are left out."""
        if not paths:
            return {}
        found = self.fs.cat([self.full(p) for p in paths], on_error="omit")
        by_full = {self.fs._strip_protocol(k): v for k, v in found.items()}
        return {p: by_full[self.full(p)] for p in paths if self.full(p) in by_full}

    def list_names(self, path: str) -> list[str]:
        """Names (not paths) of the entries directly under `path`; [] if it does not exist."""
        try:
            entries = self.fs.ls(self.full(path), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    # --- writes ---

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write so that readers see either no file or the whole file, never a part of it."""
        full = self.full(path)
        if not self.is_local:
            self.fs.pipe_file(full, data)  # one PUT: an object is visible only once complete
            return
        folder, name = posixpath.split(full)
        os.makedirs(folder, exist_ok=True)
        temporary = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, full)  # atomic for readers; not fsynced: a process crash loses nothing

    def rename(self, source: str, target: str) -> None:
        """Move a file; atomic on local disks, copy-then-delete on object stores."""
        self.fs.mv(self.full(source), self.full(target))

    def delete(self, path: str) -> None:
        """Delete a file or a folder with everything under it; nothing if it does not exist."""
        if self.fs.exists(self.full(path)):
            self.fs.rm(self.full(path), recursive=True)

    def upload_dir(self, local_dir: str, path: str) -> None:
        self.fs.put(local_dir.rstrip("/") + "/", self.full(path), recursive=True)

    def download_dir(self, path: str, local_dir: str) -> None:
        self.fs.get(self.full(path).rstrip("/") + "/", local_dir, recursive=True)

    # --- preflight ---

    def check_writable(self, prefix: str) -> None:
        """Write, read back and delete a probe under `prefix`; raise StoreError saying what failed."""
        probe = posixpath.join(prefix, f"_probe-{uuid.uuid4().hex}")
        try:
            self.write_bytes(probe, b"ok")
            if self.read_bytes(probe) != b"ok":
                raise OSError("read back different bytes than written")
            self.fs.rm(self.full(probe))
        except Exception as error:  # the filesystem's own exception types vary by protocol
            raise StoreError(f"store {self.url(prefix)!r} is not usable: {_explain(error)}") from error


def _explain(error: Exception) -> str:
    """One line for the usual ways an object store refuses: reachability, credentials, bucket."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    name = type(error).__name__
    if "EndpointConnectionError" in name or "ConnectTimeout" in name or "connect" in text.lower():
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default endpoint")
        return f"cannot reach the store's server ({endpoint}): {text}"
    if "NoCredentials" in name or "Unable to locate credentials" in text:
        return "no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run with a cloud role"
    if isinstance(error, PermissionError) or "credential" in text.lower() or "AccessDenied" in text:
        return f"access denied; check the credentials in the environment or the cloud role ({text})"
    if isinstance(error, FileNotFoundError):
        return f"bucket or path does not exist ({text})"
    return f"{name}: {text}"
