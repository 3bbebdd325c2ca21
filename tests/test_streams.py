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


def _held(*prefixes: int) -> list[str]:
    """The /dev/shm files of these streaming prefixes that this process holds
    open, one entry per descriptor (other datasets the suite left for the
    collector do not count)."""
    names = tuple(f"/dev/shm/{p:06}_" for p in prefixes)
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed between the listing and the read
            continue
        if target.startswith(names):
            held.append(target)
    return sorted(held)


def _none_held(*prefixes: int, timeout: float = 5.0) -> list[str]:
    """What is still held of these prefixes once nothing is, or after
    ``timeout`` s (an epoch's threads let go of a dataset a moment after it
    is closed)."""
    import gc
    import time

    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        now = _held(*prefixes)
        if not now or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def _read_some(dataset) -> None:
    it = iter(dataset)
    next(it)
    it.close()


def test_building_and_freeing_datasets_leaves_no_shared_memory_open(corpus, tmp_path):
    """streaming keeps every shared-memory block it opens until the process
    ends (an atexit hook each): a dataset's own six, and six of every other
    prefix in use that building a dataset opens to find a free one. A suite
    or a notebook that builds datasets again and again ran out of
    descriptors ("Too many open files" in CI). Here a dataset built beside a
    live one opens none of the other's blocks for good, and a freed dataset
    closes and unlinks its own."""
    shutil.copytree(corpus / "mds64" / "train", tmp_path / "other")
    live = CheckedStreamingDataset(local=str(tmp_path / "other"), shuffle=False, batch_size=1)
    mine = _held(live._shm_prefix_int)
    assert len(mine) == 12  # six blocks, two descriptors each (the file and its mapping)
    for _ in range(3):
        ds = CheckedStreamingDataset(local=str(corpus / "mds64" / "train"), shuffle=False, batch_size=1)
        _read_some(ds)
        prefix = ds._shm_prefix_int
        assert len(_held(prefix)) == 12
        assert _held(live._shm_prefix_int) == mine  # the live one's blocks were read, not kept open again
        del ds
        assert _none_held(prefix) == []
    _read_some(live)
    prefix = live._shm_prefix_int
    del live
    assert _none_held(prefix) == []
    assert not any(os.path.exists(n.removesuffix(" (deleted)")) for n in mine)  # unlinked: the prefix is free again


def _drop_copy_in_child(dataset, done) -> None:
    # what freeing the forked copy runs (the child's copy of the test's frame still refers to it, so
    # the collector never would here); it must leave the parent's blocks alone
    dataset.__del__()
    done.put("dropped")


def test_a_forked_copy_of_a_dataset_leaves_its_parents_shared_memory_alone(corpus, tmp_path):
    """A loader worker forked from the training process holds a copy of the
    dataset; freeing the copy must not unlink the blocks its parent uses."""
    shutil.copytree(corpus / "mds64" / "train", tmp_path / "mine")
    ds = CheckedStreamingDataset(local=str(tmp_path / "mine"), shuffle=False, batch_size=1)
    names = set(_held(ds._shm_prefix_int))
    assert names
    ctx = mp.get_context("fork")
    done = ctx.Queue()
    child = ctx.Process(target=_drop_copy_in_child, args=(ds, done))
    child.start()
    assert done.get(timeout=60) == "dropped"
    child.join(timeout=30)
    assert all(os.path.exists(n) for n in names)
    assert len(list(ds)) > 0  # and the parent reads on


def test_a_resumed_dataset_leaves_no_shared_memory_open(corpus):
    """Resuming (load_state_dict, as autoresume does) goes on at the saved
    sample; streaming's _resume opened the resume block to read it and kept
    it open until exit (a descriptor pair per resumed epoch)."""
    local = str(corpus / "mds64" / "train")
    first = CheckedStreamingDataset(local=local, shuffle=False, batch_size=1)
    whole = [s["tokens"] for s, _ in zip(first, range(8))]
    state = first.state_dict(num_samples=3, from_beginning=True)
    del first
    resumed = CheckedStreamingDataset(local=local, shuffle=False, batch_size=1)
    resumed.load_state_dict(state)
    it = iter(resumed)
    rest = [next(it)["tokens"] for _ in range(5)]
    it.close()
    assert all((a == b).all() for a, b in zip(rest, whole[3:]))
    prefixes = (resumed._shm_prefix_int,)  # where load_state_dict wrote the resume block
    del resumed, it
    assert _none_held(*prefixes) == []


def test_a_dataset_freed_after_its_exit_hooks_ran_leaves_a_reused_name_alone(corpus, tmp_path):
    """At the process's end streaming's exit hooks close and unlink the blocks
    first; a dataset freed after that (the last collection) must not unlink
    its names again: another job may have made a block under one by then."""
    from multiprocessing import shared_memory

    from mixattn.streams import shared_memory_of

    shutil.copytree(corpus / "mds64" / "train", tmp_path / "mine")
    ds = CheckedStreamingDataset(local=str(tmp_path / "mine"), shuffle=False, batch_size=1)
    blocks = shared_memory_of(ds)
    for shm in blocks:
        shm.cleanup()  # what each block's exit hook does
    name = ds._locals_shm.shm.name
    other = shared_memory.SharedMemory(name=name, create=True, size=16)  # another job's block, same name
    try:
        ds.__del__()
        assert os.path.exists(f"/dev/shm/{name.lstrip('/')}")
    finally:
        other.close()
        other.unlink()
