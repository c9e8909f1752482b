"""One run per output_dir: an advisory lock file, `<output_dir>/.run.lock`.

Created with O_CREAT | O_EXCL (atomic on local disks and on the NFS / Lustre / GPFS file systems SLURM clusters
share), it names the host, pid and start time of the run that holds it, and a daemon thread refreshes its mtime
every `HEARTBEAT_S`. A second run into the same folder stops at once with one line naming the holder. A crashed
run's lock does not block forever: it is stale when its process is gone (same host) or its heartbeat is older than
`STALE_S` (another host, whose processes this one cannot see), and the next run takes it over. Only global rank 0
takes the lock; the other ranks of the same run share the folder by design.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from .faults import FaultError

LOCK_NAME = ".run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats
WRITE_GRACE_S = 10.0  # an empty lock file younger than this is a run writing it, not a crash


class OutputDirInUse(FaultError):
    """Another live run holds the output_dir (exit 2: nothing ran, choose another folder or wait)."""

    exit_code = 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    def __init__(self, out: Path, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(out) / LOCK_NAME
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        """The lock file's content; None without a lock; {} while it is being written (or left half-written)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def stale(self, holder: dict) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if not holder:  # being written right now (created, not yet filled), or left half-written by a crash
            return age > WRITE_GRACE_S
        if age > self.stale_s:
            return True
        return holder.get("host") == self.owner["host"] and not _alive(int(holder.get("pid", -1)))

    def acquire(self, timeout_s: float = 10.0) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # each pass takes the lock, refuses, or clears a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is not None and not self.stale(holder):
                    raise self._in_use(holder) from None
                if holder is not None:
                    self._break(holder)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(self.owner, handle)
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise OutputDirInUse(f"output_dir {self.path.parent}: could not take the lock {self.path} in {timeout_s} s")

    def _break(self, seen: dict) -> None:
        """Remove the stale lock `seen`, one breaker at a time: between reading a stale lock and removing it, another
        run may have replaced it with a live one, so the breaker reads it again under its own O_EXCL file."""
        breaker = self.path.with_name(LOCK_NAME + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - breaker.stat().st_mtime > 60:  # a breaker that crashed in these few lines
                    breaker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.02)
            return
        os.close(fd)
        try:
            if self.holder() == seen and self.stale(seen):
                self.path.unlink(missing_ok=True)
        finally:
            breaker.unlink(missing_ok=True)

    def _in_use(self, holder: dict) -> OutputDirInUse:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return OutputDirInUse(
            f"output_dir {self.path.parent} is in use by pid {holder.get('pid')} on {holder.get('host')} (since "
            f"{since}; lock {self.path}): wait for that run or choose another output_dir; a crashed run's lock is "
            f"taken over once its process is gone or {self.stale_s:.0f} s after its last heartbeat"
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:  # the folder went away: nothing left to guard
                return

    def release(self) -> None:
        self._stop.set()
        if self.holder() == self.owner:  # never remove a lock another run took over
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()
