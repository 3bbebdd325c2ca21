"""Checkpoints to a remote object store through Composer's URIs: an
S3-compatible server (moto's, in a thread, on localhost) stands in for the
bucket. A run saves to s3://..., and a restart in a fresh directory
autoresumes from the bucket's newest checkpoint, bit-exact, even with a stale
earlier download where composer looks first."""

import socket

import pytest
import torch

from test_train import _cfg, _fit


@pytest.fixture
def s3(monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="ckpts")
    yield client
    server.stop()


def test_checkpoints_go_to_s3_and_autoresume_from_it(corpus, tmp_path, s3, monkeypatch):
    monkeypatch.chdir(tmp_path)  # composer downloads s3://ckpts/... to ./s3:/ckpts/...
    # a constant schedule, so a run of 4 batches continued to 8 is the 8-batch run
    flat = ["scheduler.name=constant_with_warmup", "scheduler.t_warmup=2ba"]
    full, full_w, _ = _fit(_cfg(corpus, tmp_path / "a", "max_duration=8ba", *flat))
    remote = ["save_folder=s3://ckpts/runs/tiny", "save_interval=2ba", "run_name=remote-tiny", *flat]
    first, _, _ = _fit(_cfg(corpus, tmp_path / "b", "max_duration=4ba", *remote))
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="ckpts")["Contents"])
    assert {"runs/tiny/ep0-ba2-rank0.pt", "runs/tiny/ep0-ba4-rank0.pt", "runs/tiny/latest-rank0.pt.symlink"} <= set(keys), keys
    assert s3.get_object(Bucket="ckpts", Key="runs/tiny/latest-rank0.pt.symlink")["Body"].read() == b"runs/tiny/ep0-ba4-rank0.pt"
    # a stale download from an earlier autoresume (here: the batch-2 checkpoint) where composer looks
    # first: the bucket's newest must win (mixattn removes the stale copy)
    stale = tmp_path / "s3:" / "ckpts" / "runs" / "tiny" / "latest-rank0.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(s3.get_object(Bucket="ckpts", Key="runs/tiny/ep0-ba2-rank0.pt")["Body"].read())
    # a fresh run directory, nothing local but that; the bucket has the run
    resumed, resumed_w, _ = _fit(_cfg(corpus, tmp_path / "c", "max_duration=8ba", "autoresume=true", *remote))
    assert first.losses == full.losses[:4]
    assert resumed.losses == full.losses[4:]  # resumed at batch 4 from the bucket, bit-exact
    for a, b in zip(resumed.inputs, full.inputs[4:]):
        assert torch.equal(a, b)
    for k in full_w:
        assert torch.equal(full_w[k], resumed_w[k]), k
