"""Shared fixtures: a real S3 server (moto's, on 127.0.0.1) and one Ray instance per test session.

The S3 variables are set before Ray starts, so every Ray worker inherits the endpoint and the
(fake) credentials, as workers inherit the cloud's on a cluster.
"""

import logging
import os
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_uri(s3_endpoint):
    """A fresh bucket on the moto server; returns s3://bucket/prefix."""
    import boto3

    bucket = f"cutoff-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs"


@pytest.fixture(scope="session")
def ray_address(s3_endpoint):
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def trained(tmp_path_factory, ray_address):
    """The smoke preset collected and trained once per session, in a local store: (store root,
    preset). Tests copy its "exp" folder before writing to it."""
    from pipeline.collect import collect
    from pipeline.config import load_preset
    from pipeline.store import Store
    from pipeline.train import train

    root = tmp_path_factory.mktemp("trained")
    preset = load_preset("smoke")
    store = Store(str(root))
    collect(preset, store, "exp", log=lambda line: None)
    train(preset, store, "exp", log=lambda line: None)
    return root, preset


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine (Ray tests alongside)
    torch's spinning worker threads make them orders of magnitude slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
