"""One run per run directory: a second run exits 2 naming the holder; a dead run's lock is taken over.

The holder is a real second process (flock locks belong to open files, so the kernel releases a killed
holder's lock; the lock file still names it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from arctic_vl.checkpoint.lock import LOCK_FILE, RunLock
from arctic_vl.errors import ConfigError
from tests.e2e_utils import subprocess_env

HOLDER = r"""
import sys, time
from pathlib import Path
from arctic_vl.checkpoint.lock import RunLock
lock = RunLock.acquire(Path(sys.argv[1]))
child = 0
if sys.argv[2] == "orphan":  # a child that keeps the lock open a moment after its parent dies
    import os
    from arctic_vl.checkpoint import lock as lock_module
    lock_module._HELD.clear()  # (as if it had been forked before its at-fork hook could run)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(w, b"up")
        time.sleep(1.5)
        os._exit(0)
    os.read(r, 2)
if sys.argv[2] == "fork":  # a forked child (as a DataLoader worker is) must not keep the lock alive
    import os
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(w, b"up")  # (the at-fork hooks have run by now)
        time.sleep(60)
        os._exit(0)
    os.read(r, 2)
print(f"held {child}", flush=True)
sys.stdin.read()
"""


def _hold(run_dir: Path, mode: str = "plain") -> tuple[subprocess.Popen, int]:
    """A process holding the lock of `run_dir` (with `fork`: and a forked child of it); (process, child pid)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=subprocess_env())
    word, child = proc.stdout.readline().split()
    assert word == "held"
    return proc, int(child)


def test_second_run_exits_2_naming_the_holder(in_tmp, cli):
    (in_tmp / "run.yaml").write_text("model:\n  family: llava_next\ndata:\n  sources: [train.json]\n"
                                     "trainer:\n  output_dir: out\n  max_steps: 1\n")
    holder, _ = _hold(in_tmp / "out")
    try:
        rc, _, err = cli("train", "run.yaml")
        assert rc == 2 and "Traceback" not in err, err
        assert f"run.yaml:6: trainer.output_dir: {in_tmp / 'out'} is in use by another run: pid {holder.pid} on " \
               f"host {socket.gethostname()}" in err, err
        assert not (in_tmp / "out" / "base_model").exists(), "nothing was written into the held directory"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the holder ended: the directory is free again
    with RunLock.acquire(in_tmp / "out") as lock:
        assert f"pid={os.getpid()}" in lock.path.read_text()
    assert (in_tmp / "out" / LOCK_FILE).read_text() == "", "a clean release empties the lock file"


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, warnings):
    holder, child = _hold(tmp_path, "fork")
    with pytest.raises(ConfigError, match=f"pid {holder.pid} on host"):
        RunLock.acquire(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert f"pid={holder.pid}" in (tmp_path / LOCK_FILE).read_text(), "the dead run's lock file names it"
    lock = RunLock.acquire(tmp_path)  # its forked child lives on, but closed its copy of the lock at fork
    try:
        text = "\n".join(warnings)
        assert f"taking over the lock left by pid {holder.pid} on host {socket.gethostname()}" in text, text
        assert "which is gone" in text
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid={os.getpid()}\n")
    finally:
        lock.release()
        os.kill(child, signal.SIGKILL)


def test_lock_left_open_by_a_dead_runs_child_is_taken_over_once_it_closes(tmp_path, warnings):
    """The holder is dead but a process it forked still has the file open for a moment: wait, then take over."""
    holder, child = _hold(tmp_path, "orphan")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    lock = RunLock.acquire(tmp_path)  # waits (up to DEAD_HOLDER_GRACE_S) for the child's copy to close
    try:
        assert f"taking over the lock left by pid {holder.pid}" in "\n".join(warnings)
    finally:
        lock.release()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
