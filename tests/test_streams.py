"""Jobs that start on one host at the same moment build their datasets
without colliding over streaming's shared memory (mixattn.streams)."""

import fcntl
import multiprocessing as mp
import os
import shutil
import threading

import pytest

from mixattn.streams import CheckedStreamingDataset, shm_lock_path, shm_prefix_lock


def _build(local, barrier, results):
    barrier.wait(timeout=120)  # every process past its imports: the datasets are built at the same moment
    try:
        results.put(("ok", len(CheckedStreamingDataset(local=local, shuffle=False, batch_size=1))))
    except Exception as err:  # the failure itself is the result
        results.put(("error", f"{type(err).__name__}: {err}"))


@pytest.mark.timeout(180)
def test_datasets_built_by_several_processes_at_once_all_get_their_shared_memory(corpus, tmp_path):
    """Eight processes (eight jobs' leaders), released together. Without the
    lock 3-5 of the 8 failed with FileExistsError ('/NNNNNN_locals'), in each
    of three runs here."""
    n = 8
    locals_ = []
    for i in range(n):  # streaming keys a dataset's shared memory by its local folder: one copy each
        shutil.copytree(corpus / "mds64" / "train", tmp_path / f"copy{i}")
        locals_.append(str(tmp_path / f"copy{i}"))
    # forkserver: the children fork from a clean server that has imported mixattn.streams, so they start
    # at once (spawn: 36 s here) and inherit no thread's lock (fork from the suite's process hung a child)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["mixattn.streams"])
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_build, args=(local, barrier, results)) for local in locals_]
    for p in procs:
        p.start()
    got = [results.get(timeout=150) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        p.kill()  # one still there (it should not be) must not outlive the test
    expected = len(CheckedStreamingDataset(local=locals_[0], shuffle=False, batch_size=1))
    assert got == [("ok", expected)] * n, got


def test_a_leader_waits_to_build_its_dataset_while_another_job_builds_one(corpus, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    other = os.open(shm_lock_path(), os.O_RDWR | os.O_CREAT, 0o666)  # another job, mid-build
    fcntl.flock(other, fcntl.LOCK_EX)
    built = []
    thread = threading.Thread(target=lambda: built.append(
        CheckedStreamingDataset(local=str(corpus / "mds64" / "train"), shuffle=False, batch_size=1)))
    try:
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not built  # waiting for the other job's build
    finally:
        os.close(other)  # the other job is done
    thread.join(timeout=60)
    assert len(built) == 1 and len(built[0]) > 0


@pytest.mark.parametrize("job", ["rank 1", "two processes", "launched as two"])
def test_a_job_of_several_processes_takes_no_lock(job, monkeypatch):
    """Streaming's barriers lie between its find and its create: a second
    local leader of the same job (two nodes on one host) or its rank 1
    waiting for the lock there would wait forever."""
    import torch.distributed as dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if job == "rank 1":
        monkeypatch.setenv("LOCAL_RANK", "1")
    elif job == "launched as two":  # a launcher's environment, before the process group exists
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        monkeypatch.setenv("WORLD_SIZE", "2")
    else:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    held = os.open(shm_lock_path(), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(held, fcntl.LOCK_EX)
    entered = []

    def enter():
        with shm_prefix_lock():
            entered.append(True)

    thread = threading.Thread(target=enter)
    try:
        thread.start()
        thread.join(timeout=10)
        assert entered == [True]
    finally:
        os.close(held)
