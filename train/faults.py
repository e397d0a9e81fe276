"""The one test seam for fault drills: off unless its environment variables are set.

- REWARD_HARNESS_KILL_AT=<point>:<count> sends SIGKILL to this process the count-th time it
  passes `point` (mid_step, after_step, eval, save), so a test lands a kill exactly where it
  needs one (tests/test_resume.py).
- REWARD_HARNESS_INF_WEIGHTS_AT=<step> fills one weight with inf right after that optimizer step,
  to test that non-finite weights are never written as FINAL (tests/test_resume.py).
- REWARD_HARNESS_PHASE_FILE=<path>: the trainer writes its current phase (step, eval, save)
  there, so a drill that kills at random times can tell where each kill landed
  (scripts/fault_drill.py).
"""
import contextlib
import os
import signal

from train import atomic

KILL_AT = "REWARD_HARNESS_KILL_AT"
INF_WEIGHTS_AT = "REWARD_HARNESS_INF_WEIGHTS_AT"
PHASE_FILE = "REWARD_HARNESS_PHASE_FILE"


def reached(point: str, count: int, model=None):
    """The trainer calls this at each point (mid_step, after_step, eval, save) with how many times it
    got there; it does what the environment asks at that point, and nothing otherwise."""
    if model is not None and os.environ.get(INF_WEIGHTS_AT) == str(count):
        next(model.parameters()).data.fill_(float("inf"))
    if os.environ.get(KILL_AT) == f"{point}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


def set_phase(name: str):
    path = os.environ.get(PHASE_FILE)
    if path:
        atomic.write_text(path, name)  # so a reader never sees it empty


@contextlib.contextmanager
def phase(name: str, after: str = "step"):
    """The trainer is in `name` inside the block, and in `after` once it leaves it."""
    set_phase(name)
    try:
        yield
    finally:
        set_phase(after)
