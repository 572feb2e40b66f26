"""One writer per output folder (misc/store/locks.py): a second training into a run folder is refused in one line
naming the process that holds it; the lock of a killed process is taken over."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from misc.errors import UserError
from misc.store.locks import FolderLock
from tests.conftest import ROOT, TINY_MODEL, run_cli

HOLD = ("import sys; from misc.store.locks import FolderLock; lock = FolderLock(sys.argv[1], 'wait').acquire(); "
        "print('holding', flush=True); sys.stdin.read()")


def test_a_held_folder_is_refused_naming_its_holder_and_released_after(tmp_path):
    with FolderLock(tmp_path / "run", "let it finish"):
        with pytest.raises(UserError) as refused:
            FolderLock(tmp_path / "run", "let it finish").acquire()
        assert str(refused.value) == (f"{tmp_path / 'run'} is in use by process {os.getpid()} on "
                                      f"{socket.gethostname()} (python); let it finish")
    FolderLock(tmp_path / "run", "let it finish").acquire().release()  # free again


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "holding\n"
    with pytest.raises(UserError, match=f"in use by process {holder.pid} "):
        FolderLock(tmp_path / "run", "wait").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    FolderLock(tmp_path / "run", "wait").acquire().release()  # the kernel released it with the process


@pytest.mark.slow
def test_a_second_training_into_a_run_folder_is_refused(tiny_world, tmp_path):
    out = tmp_path / "run"
    with FolderLock(out, "held by the test"):
        second = run_cli("train.py", "--preset", "demo", "--epochs", "1", *TINY_MODEL, "--out", out,
                         world=tiny_world, check=False)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: {out} is in use by process {os.getpid()} on {socket.gethostname()} (python); let it finish, or "
        f"stop it and continue it later with --resume")
    assert sorted(path.name for path in out.iterdir()) == ["lock"]  # the refused run wrote nothing
