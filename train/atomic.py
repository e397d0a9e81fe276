"""Write under a temporary name, then publish with one rename: a reader (or a resume after a kill)
sees the old state or the new one, never a half-written file or dir.

- write_file(path) / write_text(path, text): a file written as <path>.tmp-<pid>, fsynced, renamed
  onto path; the temporary file is removed on failure, so a full disk keeps no space.
- new_file(path): a file created here and now, never an existing one written through.
- publish_dir(tmp_dir, final_dir) / write_dir(final_dir): a dir filled under a temporary name gets
  its COMPLETE marker last and is then renamed into place; is_complete() tells it from a torn one.

Every temporary name ends in .tmp-<pid>, which checkpoint.remove_leftovers() deletes after a kill.
"""
import contextlib
import json
import os
import shutil

MARKER = "COMPLETE"


def temp_path(path: str) -> str:
    """Where `path` is written before it is renamed into place (train.label checks it is not its input)."""
    return f"{path}.tmp-{os.getpid()}"


def new_file(path: str, mode: str = "w", encoding=None):
    """A new file of our own at `path`, open for writing. Whatever is there (a leftover, a symlink,
    a hard link to another file) is removed, not written through, and O_EXCL refuses anything put
    there meanwhile."""
    if os.path.lexists(path):
        os.remove(path)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), mode, encoding=encoding)


@contextlib.contextmanager
def write_file(path: str, mode: str = "w", encoding=None):
    """A file that becomes `path` only if the block ends without an error. It is written as
    temp_path(path) and fsynced before the rename, so the rename never publishes data still in
    flight; on an error the temporary file is removed."""
    tmp = temp_path(path)
    try:
        with new_file(tmp, mode, encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str):
    with write_file(path) as f:
        f.write(text)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def final_metrics(run_dir: str):
    """The final eval metrics of a finished run (FINAL/metrics.json); None while it has no FINAL.
    Its accuracy is what a finished job reports to a sweeper."""
    final = os.path.join(run_dir, "FINAL")
    if not is_complete(final):
        return None
    with open(os.path.join(final, "metrics.json")) as f:
        return json.load(f)


def share_like_umask(directory: str):
    """Give the files in a dir the mode a plain open() would (0666 less the umask). transformers 5's
    save_pretrained writes model.safetensors as 0600, which hides a FINAL from the other users of
    a shared cluster, while its config and tokenizer files are readable."""
    mask = os.umask(0)
    os.umask(mask)
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def publish_dir(tmp_dir: str, final_dir: str):
    """Marker last, then one rename: a reader sees either nothing or a complete dir. An existing
    final_dir is moved aside first and deleted after, so it is never missing or half-deleted."""
    share_like_umask(tmp_dir)
    write_text(os.path.join(tmp_dir, MARKER), "")
    old = None
    if os.path.exists(final_dir):
        old = f"{final_dir}.old-{os.getpid()}"
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def write_dir(final_dir: str, keep_existing: bool = False):
    """An empty dir to fill (temp_path(final_dir)), published with publish_dir() if the block ends
    without an error and removed if not. keep_existing: when another process published final_dir
    meanwhile, theirs stays (it may be in use) and ours is dropped."""
    tmp = temp_path(final_dir)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had our pid
    os.makedirs(tmp)
    try:
        yield tmp
        if keep_existing and is_complete(final_dir):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            publish_dir(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
