"""An exclusive lock on a run directory, held by the main process for the whole run.

Two runs started with the same exp_name would otherwise both append to metrics.jsonl, write
config.yaml and checkpoints, and leave a run dir that describes neither. The lock is
filelock's FileLock (flock on Unix): the kernel drops it when its holder dies, so a run killed
with SIGKILL never blocks a later resume=auto. `.lock-owner.json` beside it says who holds it,
for the refusal message; a stale one is simply overwritten by the next holder.
"""
import json
import os
import socket
import time

from filelock import FileLock, Timeout

from train import atomic
from train.errors import UserError

LOCK_FILE = ".lock"
OWNER_FILE = ".lock-owner.json"


def owner(run_dir: str) -> dict:
    """What the holder wrote about itself; {} when the file is missing or half-written."""
    try:
        with open(os.path.join(run_dir, OWNER_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class RunLock:
    """`with RunLock(run_dir):` holds the lock, or raises a one-line UserError naming the holder."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.lock = FileLock(os.path.join(run_dir, LOCK_FILE), timeout=0)  # never wait for another run

    def __enter__(self):
        try:
            self.lock.acquire()
        except Timeout:
            held = owner(self.run_dir)
            who = (f"pid {held.get('pid')} on host {held.get('host')}, started {held.get('started')}"
                   if held else "a process that has not yet said who it is")
            raise UserError(f"{self.run_dir} is in use by another run ({who}): wait for it to end, "
                            "or choose another exp_name")
        atomic.write_text(os.path.join(self.run_dir, OWNER_FILE), json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        return self

    def __exit__(self, *exc):
        self.lock.release()
