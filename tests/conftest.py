"""Shared helpers: run the real entry points in subprocesses, offline, as a user would.

Most `python ...` commands run in tests/zygote.py, a Python that has done the 8 s of imports once
and forks per command (README, top, for what it saves). `REWARD_TESTS_FRESH=1` starts a fresh
interpreter for every command instead.
"""
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = str(Path(PYTHON).parent / "accelerate")
# The suite runs two test files at a time (pytest-xdist, `-n 2` in pyproject.toml). Each worker's
# 2-process launches get a rendezvous port of their own, so two of them never meet on one port.
PORT = str(29531 + 10 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0))
LAUNCH = [ACCELERATE, "launch", "--main_process_port", PORT]
# Small and fast: a random 2-layer Llama on a few hundred synthetic pairs.
TINY = ["model=tiny-llama", "datasets.synthetic.n_train=192", "datasets.synthetic.n_test=48",
        "n_eval_examples=48", "batch_size=16", "microbatch_size=8", "eval_every=64"]


# With two test files running at a time, a subprocess of each using every core would put two
# threads on each core, and torch's OpenMP threads spin-wait while another process holds their core:
# a MiniLM run took 100 s beside another test's run and 19 s alone. So each worker's processes
# (and the worker itself) take an equal share of the cores, unless OMP_NUM_THREADS says otherwise.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, len(os.sched_getaffinity(0)) // WORKERS) if WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ else None
if THREADS:
    import torch
    torch.set_num_threads(THREADS)


def env(**extra):
    e = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", HF_DATASETS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false")
    if THREADS:
        e["OMP_NUM_THREADS"] = str(THREADS)
    e.pop("REWARD_HARNESS_KILL_AT", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


# Environment variables the harness reads while it runs, not when it imports: a command whose
# environment differs from env() only in these can run in the zygote (tests/zygote.py).
ZYGOTE_ENV = {"OMP_NUM_THREADS", "REWARD_HARNESS_KILL_AT", "REWARD_HARNESS_INF_WEIGHTS_AT"}


class Zygote:
    """This worker's tests/zygote.py: python commands without their 8 s of imports."""
    server = None

    @classmethod
    def reply(cls, timeout=None) -> dict:
        """One reply line, read a byte at a time so that select() never waits on a buffered line."""
        line = b""
        while not line.endswith(b"\n"):
            fd = cls.server.stdout.fileno()
            if timeout is not None and not select.select([fd], [], [], timeout)[0]:
                return {}
            byte = os.read(fd, 1)
            assert byte, f"tests/zygote.py ended ({cls.server.wait()})"
            line += byte
        return json.loads(line)

    @classmethod
    def run(cls, argv, environ, timeout):
        if cls.server is None or cls.server.poll() is not None:
            cls.server = subprocess.Popen([PYTHON, str(ROOT / "tests" / "zygote.py")], cwd=ROOT, env=env(),
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            out.touch(), err.touch()
            request = {"argv": argv, "cwd": str(ROOT), "env": environ, "stdout": str(out), "stderr": str(err)}
            cls.server.stdin.write(json.dumps(request) + "\n")
            cls.server.stdin.flush()
            pid = cls.reply()["pid"]
            done = cls.reply(timeout)
            if not done:
                os.kill(pid, signal.SIGKILL)
                cls.reply()
                raise subprocess.TimeoutExpired([PYTHON, *argv], timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess([PYTHON, *argv], done["returncode"], out.read_text(), err.read_text())


def python(argv, cwd=ROOT, environ=None, timeout=600):
    """`python ARGV` in `cwd`, output captured as text: in the zygote where it can run, else fresh."""
    environ = environ or env()
    base = env()
    same = {k for k in environ.keys() | base.keys() if environ.get(k) != base.get(k)} <= ZYGOTE_ENV
    if same and Path(cwd) == ROOT and not os.environ.get("REWARD_TESTS_FRESH"):
        return Zygote.run(list(argv), environ, timeout)
    return subprocess.run([PYTHON, *argv], cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)


def launch(args, cwd=ROOT, check=True, extra_env=None, timeout=600):
    """python launch.py ARGS; returns the CompletedProcess."""
    proc = python(["launch.py", *args], cwd, env(**(extra_env or {})), timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# Runs launch.py as `python launch.py ARGS` would (its __main__ block, Hydra and all) once per
# case, in ONE interpreter: the cases that stop before training then cost milliseconds each
# instead of a fresh interpreter's import time. Prints one JSON line per case.
EACH = """
import contextlib, io, json, runpy, sys
for args in json.loads(sys.argv[1]):
    sys.argv, out, err, code = ["launch.py", *args], io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path("launch.py", run_name="__main__")
        except SystemExit as exit:
            code = exit.code
    print(json.dumps({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}))
"""


def launch_each(cases, cwd=ROOT, timeout=600) -> list:
    """launch.py for each list of args in `cases`, as CompletedProcess-like objects, in one process.
    Only for runs that stop with an error before training (see EACH)."""
    proc = python(["-c", EACH, json.dumps(cases)], cwd, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"returncode"')]
    assert proc.returncode == 0 and len(lines) == len(cases), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [subprocess.CompletedProcess(args, **json.loads(line)) for args, line in zip(cases, lines)]


def accelerate_launch(args, nproc=2, check=True, extra_env=None, timeout=600):
    config = "accelerate_config/ddp_cpu_2proc.yaml" if nproc == 2 else "accelerate_config/cpu.yaml"
    proc = python([*LAUNCH, "--config_file", config, "launch.py", *args], environ=env(**(extra_env or {})),
                  timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"accelerate launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# Runs a command line as `python ARGS` would (tests/zygote.py's run_as_python, without the server's
# imports), then prints which of the heavy packages it imported: a mistake must be reported before
# them (about a second, not ten).
IMPORTS = """
import sys
from tests.zygote import run_as_python
try:
    run_as_python(sys.argv[1:])
finally:
    print([m for m in ("torch", "transformers", "datasets", "accelerate") if m in sys.modules])
"""


def heavy_imports(argv, environ=None):
    """`python ARGV` in a fresh interpreter (the zygote has imported torch already): the
    CompletedProcess, whose stdout ends with the list of heavy packages the command imported."""
    return subprocess.run([PYTHON, "-c", IMPORTS, *map(str, argv)], cwd=ROOT, env=environ or env(),
                          capture_output=True, text=True, timeout=120)


def error_line(proc) -> str:
    """The one line a user mistake gives (exit code 2, no traceback); progress bars aside."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "tokenizing" not in line]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.args, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def metrics(run_dir):
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def main_in_process(main, capsys, *args) -> tuple:
    """An entry point's main(argv) run in this process: (exit code, stdout, stderr) of that call."""
    code = 0
    capsys.readouterr()  # what the test printed before is not the command's
    try:
        main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def final_metrics(run_dir):
    return json.loads((Path(run_dir) / "FINAL" / "metrics.json").read_text())


def final_weights(run_dir):
    from safetensors.torch import load_file
    return load_file(str(Path(run_dir) / "FINAL" / "model.safetensors"))


def max_gap(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# The shared run: 12 steps of 16 pairs, a checkpoint every 2 steps (step-8 and step-10 are kept),
# an eval every 3 steps, eval predictions written.
SHARED_RUN = [*TINY, "save_every=32", "eval_every=48", "lr=1e-3"]


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """One tiny-llama run, trained once per test session, for every test that only READS a run dir
    (the run-dir contract, labeling, the uninterrupted reference of the resume tests)."""
    cache = tmp_path_factory.mktemp("shared-run")
    launch([*SHARED_RUN, "write_predictions=true", f"cache_dir={cache}", "exp_name=shared"])
    return cache / "shared"


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


# The longest test files first, so that neither worker is left running a long file alone at the end
# (seconds per file in a full run, 2026-11-23: label 227, resume 205, sweep 157, fsdp 145, launch 106,
# smollm2 45; the rest under 40). pyproject.toml turns off xdist's own reordering, by test count.
LONGEST_FIRST = ["test_resume.py", "test_label.py", "test_sweep.py", "test_fsdp.py", "test_launch.py",
                 "test_smollm2.py", "test_lora.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
