"""The run dir under concurrency and misuse: one run per dir, names that stay inside cache_dir,
numeric keys within range. (Storage faults: tests/test_resume.py; bad rows: tests/test_inputs.py.)"""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from hydra import compose, initialize_config_dir

from tests.conftest import PYTHON, ROOT, TINY, env, error_line, launch, launch_each, metrics
from train.config import register, validate
from train.errors import UserError

register()


def lock_holder(run: Path):
    try:
        return json.loads((run / ".lock-owner.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_a_second_run_on_a_busy_run_dir_is_refused_and_a_dead_holder_blocks_nothing(cache):
    args = [*TINY, f"cache_dir={cache}", "exp_name=shared"]
    run = Path(cache) / "shared"
    first = subprocess.Popen([PYTHON, "launch.py", *args], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        # The lock, then the config it writes: under load the first run may hold one without the other yet.
        while lock_holder(run) != first.pid or not (run / "config.yaml").is_file():
            assert time.time() < deadline and first.poll() is None, "the first run never took the lock"
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock, frozen, for as long as the second run needs
        config_before = (run / "config.yaml").read_bytes()
        second = launch(args, check=False)
    finally:
        os.kill(first.pid, signal.SIGKILL)  # a holder that dies without releasing anything
        first.wait()
    line = error_line(second)
    assert f"{run} is in use by another run (pid {first.pid} on host {socket.gethostname()}" in line, line
    assert (run / "config.yaml").read_bytes() == config_before  # the second run wrote nothing
    launch([*args, "resume=auto"])  # the kernel dropped the dead run's lock
    steps = [r["step"] for r in metrics(run) if r["split"] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and (run / "FINAL" / "COMPLETE").is_file()


def test_a_run_dir_locked_by_another_process_is_refused(cache):
    """The holder named in the refusal is whoever holds the lock, here this test process."""
    from train.runlock import RunLock
    run = Path(cache) / "held"
    run.mkdir(parents=True)
    with RunLock(str(run)):
        line = error_line(launch([*TINY, f"cache_dir={cache}", "exp_name=held"], check=False))
    assert f"(pid {os.getpid()} on host {socket.gethostname()}, started " in line, line
    assert not (run / "config.yaml").exists()


RUN_DIR_MISTAKES = [
    ("../outside", "is not inside cache_dir"),
    ("a/../..", "is not inside cache_dir"),
    ("", "exp_name is empty"),
    ("tokenized", "which the harness uses as a cache"),
]


def test_run_dir_must_be_strictly_inside_cache_dir(tmp_path):
    cache = tmp_path / "cache"
    procs = launch_each([[*TINY, f"cache_dir={cache}", f"exp_name={name}"] for name, _ in RUN_DIR_MISTAKES])
    for (name, message), proc in zip(RUN_DIR_MISTAKES, procs):
        assert message in error_line(proc), (name, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "something was written"


def composed(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose("config", overrides=["model=tiny-llama", *overrides])


@pytest.mark.parametrize("override,message", [
    ("lr=-1", "lr must be more than 0, got -1"),
    ("lr=nan", "lr must be a finite number"),
    ("weight_decay=-0.1", "weight_decay must be at least 0"),
    ("warmup=1", "warmup must be at least 0 and less than 1"),
    ("max_grad_norm=0", "max_grad_norm must be more than 0"),
    ("seed=-1", "seed must be at least 0"),
    ("save_every=0", "save_every must be at least 1"),
    ("num_workers=-1", "num_workers must be at least 0"),
    ("eval_every=0", "eval_every must be at least 1"),
    ("loss.center_rewards_coefficient=-1", "loss.center_rewards_coefficient must be at least 0"),
    ("model.max_length=0", "model.max_length must be at least 2"),
    ("model.max_prompt_length=-5", "model.max_prompt_length must be at least 0"),
    ("datasets.synthetic.n_train=-4", "datasets.synthetic.n_train must be at least 0"),
    ("local_run_dir=/tmp", "is not inside cache_dir"),
])
def test_every_numeric_key_is_range_checked_before_any_model_loads(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        validate(composed(override))
    validate(composed())  # the defaults pass


def test_file_source_test_fraction_is_range_checked(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(UserError, match=r"datasets.jsonl.test_fraction must be more than 0 and less than 1, got 1.5"):
        validate(composed("datasets=[jsonl]", f"++datasets.jsonl.path={data}", "++datasets.jsonl.test_fraction=1.5"))


def test_a_run_saved_before_a_config_key_existed_resumes_while_the_key_keeps_its_default(tmp_path):
    """config.yaml of a run from before model.peft existed: resuming it is not a change of setting,
    unless the new key is set to something else."""
    from train.build import check_resume_config
    from train.errors import UserError

    saved = OmegaConf.to_container(composed(), resolve=True)
    del saved["model"]["peft"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    check_resume_config(composed(), str(tmp_path))
    with pytest.raises(UserError, match="cannot resume .*'model' was"):
        check_resume_config(composed("model.peft.enabled=true"), str(tmp_path))


def test_a_user_error_leaves_the_process_group_before_exiting(tmp_path):
    # A distributed process that ends the usual way can die with SIGABRT in the interpreter's
    # teardown instead of returning its exit code (train/errors.leave).
    script = (
        "import atexit, torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/rendezvous', rank=0, world_size=1)\n"
        "atexit.register(lambda: print('in a group at exit:', dist.is_initialized()))\n"
        "from train.errors import exit_with_error\n"
        "exit_with_error('bad value')\n")
    proc = subprocess.run([PYTHON, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("error: bad value"), proc.stderr
    assert "in a group at exit: False" in proc.stdout
    # A process of a multi-process run (torchrun sets WORLD_SIZE) skips the teardown altogether.
    (tmp_path / "rendezvous").unlink(missing_ok=True)
    proc = subprocess.run([PYTHON, "-c", script], cwd=ROOT, env=env(WORLD_SIZE=2), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("error: bad value"), proc.stderr
    assert "in a group at exit" not in proc.stdout
