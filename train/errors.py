"""What a run tells its user: messages (say), and user mistakes as one line; anything else is a bug
and keeps its traceback."""
import errno
import logging
import os
import sys

from tqdm.auto import tqdm

# Under launch.py, config.yaml's hydra.job_logging sends this logger to the run dir's launch.log (with
# timestamps) and nowhere else: the console gets the messages from say() and exit_with_error().
LOG = logging.getLogger("train")


class UserError(Exception):
    """A mistake in config or input that the user can fix; printed as one line, exit code 2."""


class NotStarted(UserError):
    """A sweep job refused because an earlier job was stopped by a signal: one Ctrl-C stops the sweep."""


# Write failures that are the machine's state, not a bug: one line instead of a traceback.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def is_user_fault(err: BaseException) -> bool:
    """Whether err is reported in one line: a UserError, or a write that failed for a storage reason."""
    return isinstance(err, UserError) or (isinstance(err, OSError) and err.errno in STORAGE_ERRNOS)


def is_main_process() -> bool:
    """Whether this process speaks for the run: rank 0 under `accelerate launch` (which sets RANK),
    or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def say(message: str):
    """A message of the run: on the console above any progress bar, and in launch.log."""
    tqdm.write(message)
    if LOG.handlers:  # only where Hydra configured it: elsewhere logging would print it a second time
        LOG.info(message)


def exit_with_error(message):
    """How every entry point stops on a UserError: `error: <message>` on stderr, exit code 2. Every
    process of a distributed run exits; only the main one prints, so the line appears once."""
    if is_main_process():
        print(f"error: {message}", file=sys.stderr)
        if LOG.handlers:
            LOG.error(message)
    leave(2)


def leave(code: int):
    """How every entry point ends: exit code `code`. A process of a distributed run (WORLD_SIZE > 1)
    leaves its group, flushes its output and ends at once (os._exit), skipping the interpreter's
    teardown: there, threads of torch's were destroyed while still running, and a finished 2-process
    run died with SIGABRT ("terminate called without an active exception") instead of exit code 0,
    about once per full test run. Leaving the group alone (pytorch/pytorch#190489) did not stop it.
    A single process exits as usual."""
    dist = sys.modules.get("torch.distributed")  # never imports torch for a config error
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def storage_error(what: str, err: Exception) -> str:
    """One line for a failed write (a full disk, a read-only or forbidden dir): what failed, where, why.

    torch.save reports a failed write as a RuntimeError whose context is the OSError; that one
    says why (e.g. No space left on device)."""
    cause = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return f"{what}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    where = f" ({cause.filename})" if cause.filename else ""
    return f"{what}: {cause.strerror or cause}{where}"
