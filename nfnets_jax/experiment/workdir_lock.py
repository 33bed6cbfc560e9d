"""One run per workdir: an OS file lock held for the whole run.

The lock is `fcntl.flock` on `WORKDIR/run.lock`, so it belongs to the open
file and the kernel drops it when the process ends, however it ends
(SIGKILL included): a lock left by a dead process never blocks. The file
holds who took it last (pid, host, start time), shown to a run that finds
the workdir taken. On several hosts, process 0 (the one that writes the
logs and the run's files) takes it for the run.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Any

LOCK_FILE = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another live process runs in this workdir."""

  def __init__(self, workdir: str, holder: dict[str, Any]):
    self.workdir = workdir
    self.holder = holder
    who = ", ".join(f"{k} {holder[k]}" for k in ("pid", "host", "started")
                    if k in holder) or "a process that has not said who it is"
    super().__init__(
        f"workdir {workdir} is in use by another run ({who}). Wait for that "
        "run to end or stop it (this run resumes from its newest checkpoint "
        "afterwards), or give this run another --workdir. The lock goes "
        f"away with its process: {os.path.join(workdir, LOCK_FILE)}.")


class WorkdirLock:
  """The lock of one workdir, taken with `try_acquire`, dropped by `release`.

  Example:
    lock = WorkdirLock(workdir)
    holder = lock.try_acquire()  # None: taken; else who holds it.
    try:
      ...
    finally:
      lock.release()
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def try_acquire(self) -> dict[str, Any] | None:
    """Takes the lock without waiting (creating the workdir if needed).

    Returns:
      None if this process now holds the lock; otherwise the holder's
      record (`pid`, `host`, `started`, `argv`; empty if it has not written
      it yet).
    """
    os.makedirs(self.workdir, exist_ok=True)
    f = open(self.path, "a+")  # Not truncated: the holder's record stays.
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      text = f.read()
      f.close()
      try:
        return json.loads(text)
      except json.JSONDecodeError:
        return {}
    f.seek(0)
    f.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(),
               "started": datetime.datetime.now().astimezone().isoformat(
                   timespec="seconds"),
               "argv": sys.argv}, f)
    f.flush()
    self._file = f
    return None

  def release(self) -> None:
    """Drops the lock (closing the file drops it); a no-op if not held."""
    if self._file is not None:
      self._file.close()
      self._file = None
