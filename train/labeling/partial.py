"""<output>.partial.jsonl: the progress of a labeling run, so a killed run continues where it stopped.

The first line is a header naming everything a reward depends on (samples file, reward model
files, formatting); then one [row, reward] line per scored sample, in input order, appended and
fsynced chunk by chunk. A rerun with the same header keeps the complete lines; another header
means other settings, and the file is started over.
"""
import json
import os

from train import atomic


def _file_id(path: str) -> list:
    stat = os.stat(path)
    return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]


def header(samples_path: str, split, reward_model_path: str, setup: dict) -> dict:
    """Everything a reward depends on; a partial file with another header is not reused."""
    model = os.path.normpath(reward_model_path)
    weights = [_file_id(os.path.join(model, n)) for n in sorted(os.listdir(model))
               if n.endswith((".safetensors", ".bin", "config.json"))] if os.path.isdir(model) else [model]
    return {"samples": _file_id(samples_path), "split": split, "reward_model": weights,
            **{k: setup[k] for k in ("max_length", "max_prompt_length", "truncation", "dtype")}}


def partial_path(output_path: str) -> str:
    return f"{output_path}.partial.jsonl"


class PartialFile:
    """<output>.partial.jsonl: a header naming what was scored, then one [row, reward] line per sample.

    It is always a file of its own: a symlink or hard link found at its path is replaced, and
    writes never follow a symlink, so a link cannot redirect them onto another file (the input)."""

    def __init__(self, path: str, header: dict):
        self.path, self.header = path, header

    def resume(self, log) -> int:
        """Samples already scored with the same settings (0 for a fresh start); cuts a torn last line."""
        good, done = 0, 0  # bytes and samples worth keeping
        if os.path.islink(self.path) or (os.path.exists(self.path) and os.stat(self.path).st_nlink > 1):
            log(f"{self.path} is a link, not a progress file of its own: starting over")
        elif os.path.exists(self.path):
            with open(self.path, "rb") as f:
                first = f.readline()
                try:
                    old = json.loads(first)
                except ValueError:
                    old = None
                if old == self.header:
                    good = len(first)
                    for line in f:
                        if not line.endswith(b"\n"):  # torn by a kill mid-write
                            break
                        good += len(line)
                        done += 1
                else:
                    changed = sorted(k for k in self.header if (old or {}).get(k) != self.header[k])
                    log(f"{self.path} was written with different settings ({', '.join(changed)}): starting over")
        if done:
            with self._open() as f:
                f.truncate(good)
            log(f"resuming: {done} samples already scored in {self.path}")
        else:
            with atomic.new_file(self.path) as f:  # a link at the path is removed, not written through
                f.write(json.dumps(self.header) + "\n")
        return done

    def _open(self):
        """For writing at the end, never through a symlink (one put there after resume())."""
        return os.fdopen(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW), "w")

    def append(self, scored: list):
        with self._open() as f:
            f.write("".join(json.dumps([row, reward]) + "\n" for row, reward in scored))
            f.flush()
            os.fsync(f.fileno())  # a kill after this loses nothing already reported as done

    def saved(self) -> int:
        """Samples whose lines are complete in the file: what a rerun keeps (0 if there is no file)."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path, "rb") as f:
            next(f, None)
            return sum(1 for line in f if line.endswith(b"\n"))  # not a line torn by a stop mid-write

    def rewards(self):
        """(row, reward) in input order."""
        with open(self.path) as f:
            next(f)
            for line in f:
                row, reward = json.loads(line)
                yield row, reward
