"""One run per output_dir (train/runtime/run_lock.py): a second run into a folder a live run holds stops at once
with one line naming the holder (exit 2, before any model loads); a crashed run's lock is taken over; concurrent
takers of a stale lock end with exactly one owner; a run releases its lock when it ends, however it ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from train.runtime.run_lock import LOCK_NAME, OutputDirInUse, RunLock

from .conftest import small


def _write_lock(out, host: str, pid: int, age_s: float = 0.0) -> None:
    path = out / LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "started": time.time() - age_s}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_held_folder_refuses_a_second_run_and_is_free_after_release(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(OutputDirInUse, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(tmp_path).acquire().release()


def test_a_crashed_runs_lock_is_taken_over(tmp_path):
    _write_lock(tmp_path, socket.gethostname(), _dead_pid())  # same host, process gone
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    _write_lock(tmp_path, "another-node", 12345, age_s=3600)  # another host, heartbeat an hour old
    RunLock(tmp_path).acquire().release()


def test_another_hosts_live_lock_is_respected(tmp_path):
    _write_lock(tmp_path, "another-node", 12345, age_s=5)  # its heartbeat is recent: that run may be alive
    with pytest.raises(OutputDirInUse, match="another-node"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "another-node"  # untouched


def test_the_heartbeat_keeps_a_long_run_from_looking_stale(tmp_path):
    lock = RunLock(tmp_path, stale_s=1.0, heartbeat_s=0.1).acquire()
    os.utime(tmp_path / LOCK_NAME, (0, 0))
    time.sleep(0.5)
    assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 1.0
    lock.release()


def test_concurrent_takers_of_a_stale_lock_end_with_one_owner(tmp_path):
    _write_lock(tmp_path, socket.gethostname(), _dead_pid())
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def take() -> None:
        barrier.wait()
        try:
            RunLock(tmp_path).acquire()
            outcomes.append("owner")
        except OutputDirInUse:
            outcomes.append("refused")

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["owner"] + ["refused"] * 7, outcomes


def test_the_cli_refuses_a_held_output_dir_in_one_line(tmp_path, teacher_cache, forked_cli):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(out, socket.gethostname(), holder.pid)
        start = time.perf_counter()
        result = forked_cli(*small(out, teacher_cache))
        seconds = time.perf_counter() - start
    finally:
        holder.kill()
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: output_dir") and f"pid {holder.pid}" in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (out / "init").exists() and seconds < 60  # refused before any stage or teacher work
