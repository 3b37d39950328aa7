import os
import pickle

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.store import Store, StoreError


@pytest.fixture(params=["local", "file-uri", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "runs"))
    if request.param == "file-uri":
        return Store(f"file://{tmp_path}/runs")
    return Store(request.getfixturevalue("s3_uri"))


def test_write_read_list_delete(store):
    store.write_bytes("exp/a/one.json", b"1")
    store.write_bytes("exp/a/two.json", b"2")
    store.write_bytes("exp/a/one.json", b"11")  # replace
    assert store.read_bytes("exp/a/one.json") == b"11"
    assert store.list_names("exp/a") == ["one.json", "two.json"]  # no temporary files left behind
    assert store.read_many(["exp/a/one.json", "exp/a/missing", "exp/a/two.json"]) == {
        "exp/a/one.json": b"11", "exp/a/two.json": b"2"}
    store.rename("exp/a/two.json", "exp/a/three.json")
    assert store.list_names("exp/a") == ["one.json", "three.json"]
    store.delete("exp/a")
    assert store.list_names("exp/a") == [] and store.list_names("exp/never") == []


def test_directories_upload_and_download(store, tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "w.bin").write_bytes(b"w")
    (source / "sub" / "v.bin").write_bytes(b"v")
    store.upload_dir(str(source), "exp/ckpt/step=5")
    target = tmp_path / "dst"
    store.download_dir("exp/ckpt/step=5", str(target))
    assert (target / "w.bin").read_bytes() == b"w" and (target / "sub" / "v.bin").read_bytes() == b"v"


def test_pyarrow_reads_through_the_same_filesystem(store):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": [1, 2, 3]}), sink)
    store.write_bytes("exp/t/env=E/part-0.parquet", sink.getvalue().to_pybytes())
    store.write_bytes("exp/t/env=E/_staged.parquet", b"not parquet")  # hidden names are skipped
    table = ds.dataset(store.full("exp/t"), filesystem=store.arrow_fs, partitioning="hive").to_table()
    assert table["x"].to_pylist() == [1, 2, 3] and table["env"].to_pylist() == ["E"] * 3


def test_pickles_as_its_uri_only(store):
    assert pickle.loads(pickle.dumps(store)).uri == store.uri
    assert b"testing" not in pickle.dumps(store)  # the credentials do not travel


def test_check_writable_passes_and_leaves_nothing(store):
    store.check_writable("exp")
    assert store.list_names("exp") == []


def test_missing_bucket_is_named(s3_endpoint):
    with pytest.raises(StoreError, match=r"s3://no-such-bucket-here/x/exp.*does not exist"):
        Store("s3://no-such-bucket-here/x").check_writable("exp")


def test_unreachable_server_is_named(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StoreError, match=r"cannot reach the store's server \(http://127.0.0.1:9\)"):
        Store("s3://bucket/x").check_writable("exp")


def test_unknown_protocol_is_named():
    with pytest.raises(StoreError, match="nosuchproto://x"):
        Store("nosuchproto://x/y")


@pytest.fixture(scope="module")
def s3_endpoint_checking_credentials():
    """A second moto server, with authentication on: keys it never issued are refused."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    yield url
    server.kill()
    server.wait()


def test_bad_credentials_are_named(s3_endpoint_checking_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint_checking_credentials)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreError, match="access denied; check the credentials") as error:
        Store("s3://bucket/x").check_writable("exp")
    assert "not-the-secret" not in str(error.value)


def test_relative_local_store_means_the_same_folder_from_any_working_directory(tmp_path, monkeypatch):
    # Tune runs each trial in its own working directory: a store given as ./runs must still be ./runs there.
    monkeypatch.chdir(tmp_path)
    store = Store("./runs")
    store.write_bytes("x/a.txt", b"1")
    monkeypatch.chdir(tmp_path / "runs")
    assert pickle.loads(pickle.dumps(store)).read_bytes("x/a.txt") == b"1"
    assert store.uri == str(tmp_path / "runs")
