"""User mistakes are reported as one line; anything else is a bug and keeps its traceback."""
import logging
import os
import sys


class UserError(Exception):
    """A mistake in config or input that the user can fix; printed as one line, exit code 2."""


def is_main_process() -> bool:
    """Whether this process speaks for the run: rank 0 under `accelerate launch` (which sets RANK),
    or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def exit_with_error(message):
    """How every entry point stops on a UserError: `error: <message>` on stderr, exit code 2. Every
    process of a distributed run exits; only the main one prints, so the line appears once."""
    if is_main_process():
        print(f"error: {message}", file=sys.stderr)
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
