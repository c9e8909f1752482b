"""`python -m tests.faults.forked_cli <module>...`: a server that runs `python -m train` commands, each in its own
process, without each paying the interpreter's ~7 s of imports (torch, transformers, Hydra, Lightning). For the
tests of commands that end in an error within a second or two, where startup is nearly all of their time.

It imports the modules named on its command line once, then reads batches of commands from stdin, one JSON list a
line, each command {"args": [...], "env": {...}, "out": prefix}; it forks one child per command, two at a time,
and answers the line `done` when the batch has finished. A child is the real CLI as `-m` runs it (runpy, like
tests/faults/driver.py) with the command's argv and environment (the whole of it, as subprocess passes `env`),
stdin from /dev/null, stdout and stderr in `<prefix>.stdout` / `<prefix>.stderr` (at the file-descriptor level:
whatever the process writes lands there) and its own exit status in `<prefix>.rc` (as subprocess reports it):
SystemExit's code, or 1 after an uncaught exception with its traceback on stderr, as the interpreter does, after
the interpreter's exit handlers ran. What a command imports beyond the preloaded modules, it imports itself.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import sys
import threading
import traceback

JOBS = 2


def _child(command: dict) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        for fd, path, flags in (
            (0, os.devnull, os.O_RDONLY),
            (1, command["out"] + ".stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            (2, command["out"] + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        ):
            target = os.open(path, flags, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.environ.clear()
        os.environ.update(command["env"])
        sys.argv = [sys.argv[0], *command["args"]]
        try:
            runpy.run_module("train", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:  # as the interpreter maps it
            if stop.code is None:
                code = 0
            elif isinstance(stop.code, int):
                code = stop.code
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads, then the exit
        atexit._run_exitfuncs()  # handlers (logging.shutdown, multiprocessing's, ...)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _run(batch: list[dict]) -> None:
    waiting, running = list(batch), {}
    while waiting or running:
        while waiting and len(running) < JOBS:
            command = waiting.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(command)
            running[pid] = command
        pid, status = os.wait()
        command = running.pop(pid)
        with open(command["out"] + ".rc", "w") as handle:
            handle.write(str(os.waitstatus_to_exitcode(status)))


def main() -> None:
    for module in sys.argv[1:]:
        importlib.import_module(module)
    # fork() copies only the calling thread: a preloaded module that started a thread would leave its lock state
    # behind in every child
    assert threading.active_count() == 1, [t.name for t in threading.enumerate()]
    while line := sys.stdin.readline():
        _run(json.loads(line))
        print("done", flush=True)


if __name__ == "__main__":
    main()
