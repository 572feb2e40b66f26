"""One writer per output folder: a training run folder, an extraction's parts. The lock is ``fcntl.flock`` on
``FOLDER/lock``: the kernel releases it when its process ends, however it ends, so the lock of a killed run is
simply taken by the next one; the file names its holder so that a refused process can say who it waits for."""
from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import TextIO

from misc.errors import UserError
from misc.store.files import writing


class FolderLock:
    """An exclusive lock on ``folder``, held from :meth:`acquire` (or ``with``) to :meth:`release`; ``advice`` ends
    the one-line refusal (what to do about the other process)."""

    def __init__(self, folder: Path | str, advice: str) -> None:
        self.folder, self.advice = Path(folder), advice
        self.file: TextIO | None = None

    def acquire(self) -> FolderLock:
        with writing(self.folder):  # a read-only or full output folder: one line, before any work
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(self.folder / "lock", "a+")  # noqa: SIM115 - held open while the lock is held
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{self.folder} is in use by {holder}; {self.advice}") from None
        handle.seek(0)
        handle.truncate()
        script = Path(sys.argv[0]).name if sys.argv else ""
        command = script if script.endswith(".py") and script != "__main__.py" else "python"
        handle.write(f"process {os.getpid()} on {socket.gethostname()} ({command})")
        handle.flush()
        self.file = handle
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor releases the lock
            self.file = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()
