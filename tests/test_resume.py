"""Exact resume after SIGKILL at several points, atomic checkpoints, preemption, non-finite values."""
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import (PYTHON, ROOT, SHARED_RUN, TINY, accelerate_launch, env, final_metrics, final_weights,
                            launch, launch_each, metrics)

RUN = SHARED_RUN  # the runs here are interrupted copies of the shared one
TIMING = ("pairs_per_s", "tokens_per_s", "train_seconds")


def comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture
def reference(shared_run):
    """The uninterrupted run (write_predictions changes neither its metrics nor its weights)."""
    return shared_run


def assert_same_run(run, reference, steps=12):
    w, ref = final_weights(run), final_weights(reference)
    assert all(torch.equal(w[k], ref[k]) for k in ref), "FINAL weights differ from the uninterrupted run"
    got, want = metrics(run), metrics(reference)
    train = [r["step"] for r in got if r["split"] == "train"]
    assert train == list(range(1, steps + 1)), train  # no step missing or repeated
    assert comparable(got) == comparable(want)


def killed_at(point, args, **extra_env):
    """launch.py ARGS, SIGKILLed by the trainer at `point` (train/faults.py). Unbuffered, so what it
    printed before the kill is in its stdout."""
    proc = launch(args, check=False, extra_env={"REWARD_HARNESS_KILL_AT": point, "PYTHONUNBUFFERED": 1, **extra_env})
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-3000:])
    return proc


def test_sigkill_at_every_point_then_resume_is_bit_identical(tmp_path, reference):
    """One run dir killed five times, once at each kill point, each time continued with resume=auto
    (the last time from an explicit checkpoint path): it ends bit-identical to the uninterrupted run.

    | launch | with | killed | leaves | the next one resumes from |
    | 1 | no save_every | after step 5 | records of steps 1-5, no checkpoint | nothing: a fresh start |
    | 2 | save_every | in the save of step 4 | step-2, a torn .tmp-step-4 | step-2 |
    | 3 | resume=auto | mid step 5 (a microbatch done) | step-2, step-4 | step-4 |
    | 4 | resume=auto | after step 7 | step-4, step-6 | step-6 |
    | 5 | resume=auto | in the eval of step 9 | step-6, step-8 | step-8, passed by path |
    """
    cache = str(tmp_path)
    run = Path(cache) / "run"
    root = run / "checkpoints"
    args = [*RUN, f"cache_dir={cache}", "exp_name=run"]

    # 1. killed before its first checkpoint: the next start is a fresh one, and keeps no record of this one
    killed_at("after_step:5", [a for a in args if not a.startswith("save_every")])
    assert len(metrics(run)) > 5 and not root.exists()

    # 2. killed between writing a checkpoint's files and its COMPLETE marker: step-4 is torn
    killed_at("save:2", [*args, "resume=auto"])  # nothing to resume: a fresh start
    assert (root / "step-2" / "COMPLETE").is_file()
    torn = root / ".tmp-step-4"
    assert torn.is_dir() and (torn / "model.safetensors").is_file() and not (torn / "COMPLETE").exists()

    # 3. the torn save is removed, step-2 is used; killed with one microbatch of step 5 done
    out = killed_at("mid_step:5", [*args, "resume=auto"]).stdout
    assert f"removing {torn}: left by a save that did not finish" in out
    assert f"resumed from {root}/step-2 at step 2" in out

    # 4. killed after step 7's record is written, before its checkpoint could be
    out = killed_at("after_step:7", [*args, "resume=auto"]).stdout
    assert f"resumed from {root}/step-4 at step 4" in out

    # 5. killed while scoring the eval of step 9 (the first eval of this process)
    out = killed_at("eval:1", [*args, "resume=auto"]).stdout
    assert f"resumed from {root}/step-6 at step 6" in out
    assert not (run / "FINAL").exists() and sorted(p.name for p in root.iterdir()) == ["step-6", "step-8"]

    # what a rerun may not do to a run dir with checkpoints (these stop before training, so one interpreter)
    shutil.copytree(root / "step-8", tmp_path / "loose-step-8")  # a checkpoint away from its run dir
    base = [a for a in args if not a.startswith("exp_name=")]
    again, changed, elsewhere, loose = launch_each([
        args, [*args, "resume=auto", "lr=2e-3"], [*base, "exp_name=other", f"resume={root / 'step-8'}", "lr=2e-3"],
        [*base, "exp_name=other2", f"resume={tmp_path / 'loose-step-8'}"]])
    assert again.returncode == 2 and "already holds checkpoints: pass resume=auto" in again.stderr
    assert changed.returncode == 2 and "'lr' was 0.001 in the checkpointed run, now 0.002" in changed.stderr
    # resume=PATH into another run dir is checked against the checkpoint's own run, not the new dir
    assert elsewhere.returncode == 2 and f"cannot resume {run}: 'lr' was 0.001" in elsewhere.stderr, elsewhere.stderr
    assert loose.returncode == 2 and f"resume={tmp_path / 'loose-step-8'}: not inside a run dir" in loose.stderr, \
        loose.stderr

    resumed = launch([*args, f"resume={root / 'step-8'}"])
    assert f"resumed from {root / 'step-8'} at step 8" in resumed.stdout
    assert_same_run(run, reference)
    assert "length_grouping: true" in (run / "config.yaml").read_text()  # ...with the length-grouped order
    assert not leftovers(run)

    done, skip, other = launch_each([args, [*args, "resume=auto"], [*args, "resume=auto", "lr=2e-3"]])
    assert done.returncode == 2 and "already holds a finished run (FINAL): choose another exp_name" in done.stderr
    assert skip.returncode == 0 and "run already finished" in skip.stdout
    # resume=auto would report the finished run's result as this config's: refused instead
    assert other.returncode == 2 and "finished with 'lr' = 0.001, now 0.002" in other.stderr


def test_resume_is_exact_with_dropout_on_and_keeps_the_wandb_run_id(tmp_path):
    """Dropout draws from the RNG at every step, so the resumed run only matches the uninterrupted one
    if the RNG state is restored; the resumed run also logs to the same wandb run (same id)."""
    cache = str(tmp_path)
    args = [*RUN, "model.disable_dropout=false", "+model.init_config.attention_dropout=0.3",
            "+model.init_config.hidden_dropout=0.3", f"cache_dir={cache}"]
    launch([*args, "exp_name=ref"])  # without wandb: wandb being on must not change the run either
    wandb = ["exp_name=run", "wandb.enabled=true", "wandb.mode=offline"]
    killed = launch([*args, *wandb], check=False, extra_env={"REWARD_HARNESS_KILL_AT": "after_step:7"})
    assert killed.returncode == -signal.SIGKILL
    run = Path(cache) / "run"
    state = json.loads((run / "checkpoints" / "step-6" / "state.json").read_text())
    assert state["wandb_id"]
    launch([*args, *wandb, "resume=auto"])
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(state["wandb_id"]) for r in runs)
    assert_same_run(run, Path(cache) / "ref")


def test_keep_last_n_checkpoints_and_checkpoint_contents(reference):
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert names == ["step-10", "step-8"]  # saves at 2,4,6,8,10; default keep_last_n_checkpoints=2
    files = sorted(p.name for p in (reference / "checkpoints" / "step-10").iterdir())
    assert files == ["COMPLETE", "model.safetensors", "optimizer.pt", "rng-0.pt", "scheduler.pt", "state.json"]
    state = json.loads((reference / "checkpoints" / "step-10" / "state.json").read_text())
    assert state["step"] == 10 and state["examples"] == 160
    optimizer = torch.load(reference / "checkpoints" / "step-10" / "optimizer.pt", weights_only=True)
    moments = next(iter(optimizer["state"].values()))
    assert "exp_avg" in moments and "exp_avg_sq" in moments and moments["exp_avg_sq"].abs().sum() > 0


def test_two_process_kill_and_resume_matches_uninterrupted_two_process_run(tmp_path):
    # 6 steps (checkpoints at 2 and 4, an eval at 3): killed after step 3, resumed from step-2.
    cache = str(tmp_path)
    args = [*(a for a in RUN if not a.startswith(("datasets.synthetic.n_train=", "microbatch_size="))),
            "datasets.synthetic.n_train=96", "microbatch_size=4", f"cache_dir={cache}"]
    accelerate_launch([*args, "exp_name=ref2"])
    killed = accelerate_launch([*args, "exp_name=run2"], check=False, extra_env={"REWARD_HARNESS_KILL_AT": "after_step:3"})
    assert killed.returncode != 0
    resumed = accelerate_launch([*args, "exp_name=run2", "resume=auto"])
    run, ref = Path(cache) / "run2", Path(cache) / "ref2"
    assert f"resumed from {run}/checkpoints/step-2 at step 2" in resumed.stdout
    assert final_metrics(run)["world_size"] == 2
    assert sorted(p.name for p in (run / "checkpoints" / "step-4").glob("rng-*")) == ["rng-0.pt", "rng-1.pt"]
    assert_same_run(run, ref, steps=6)


def wait_for_records(path: Path, n: int, proc):
    """Until metrics.jsonl holds n records (the run is then in its training loop, signal handlers set)."""
    deadline = time.time() + 120
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        assert time.time() < deadline and proc.poll() is None, "the run ended before it could be signalled"
        time.sleep(0.05)


def test_preemption_signals_save_and_exit_cleanly_and_the_run_continues(tmp_path):
    """SIGTERM (a scheduler's preemption) and then, on the resumed run, SIGINT (Ctrl-C): each stops
    the run at the next step boundary with a checkpoint and exit code 0; resume=auto finishes it."""
    cache = str(tmp_path)
    # 50 steps of 8 pairs: each signal lands within a few steps, far from the end
    args = ["model=tiny-llama", "datasets.synthetic.n_train=400", "datasets.synthetic.n_test=32",
            "n_eval_examples=32", "batch_size=8", "microbatch_size=4", "eval_every=100000", "do_first_eval=false",
            f"cache_dir={cache}", "exp_name=pre"]
    run = Path(cache) / "pre"
    step = 0
    for sig, extra in ((signal.SIGTERM, []), (signal.SIGINT, ["resume=auto"])):
        proc = subprocess.Popen([PYTHON, "launch.py", *args, *extra], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        wait_for_records(run / "metrics.jsonl", step + 3, proc)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "resume=auto" in out
        assert not (run / "FINAL").exists()
        if step:
            assert f"resumed from {run}/checkpoints/step-{step} at step {step}" in out
        before = step
        step = max(json.loads((c / "state.json").read_text())["step"] for c in run.glob("checkpoints/step-*"))
        assert before + 3 <= step < 50, (sig, before, step)
        saved = [f"step-{before}", f"step-{step}"] if before else [f"step-{step}"]  # the one save per signal
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(saved)
        assert [r["step"] for r in metrics(run)] == list(range(1, step + 1))
    launch([*args, "resume=auto"])
    train = [r["step"] for r in metrics(run) if r["split"] == "train"]
    assert train == list(range(1, 51)) and (run / "FINAL" / "COMPLETE").is_file()


def test_nonfinite_loss_stops_with_step_and_last_checkpoint(tmp_path):
    # SGD at lr 3e38 without clipping: step 1 is finite, its weights overflow every later forward.
    args = [*TINY, "lr=3e38", "optimizer=SGD", "warmup=0", "max_grad_norm=1e38", "save_every=16",
            f"cache_dir={tmp_path}"]
    proc = launch([*args, "exp_name=nan"], check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]  # after the progress bar
    assert "Traceback" not in proc.stderr and line.startswith("error: ")
    assert f"non-finite loss or gradient at step 2; last good checkpoint: {tmp_path}/nan/checkpoints/step-1" in line
    assert not (tmp_path / "nan" / "FINAL").exists()
    skip = launch([*args, "exp_name=nan-skip", "on_nonfinite=skip"])
    final = final_metrics(tmp_path / "nan-skip")
    assert final["skipped_steps"] == final["steps"] - 1 == 11  # every step after the first
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "nan-skip").values())
    assert skip.returncode == 0


def test_nonfinite_weights_are_never_written_as_final(tmp_path):
    args = [*TINY, "on_nonfinite=skip", f"cache_dir={tmp_path}", "exp_name=blowup"]
    proc = launch(args, check=False, extra_env={"REWARD_HARNESS_INF_WEIGHTS_AT": 3})
    assert proc.returncode == 2 and "non-finite weights" in proc.stderr
    assert not (tmp_path / "blowup" / "FINAL").exists()


# ---- storage faults: a small tmpfs (needs root to mount; skipped otherwise) -------------------------
@pytest.fixture
def small_disk(tmp_path):
    """(mount point, resize(size, mode)) of a tmpfs that starts at 1 MB."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")

    def resize(size, mode="rw"):
        subprocess.run(["mount", "-o", f"remount,{mode},size={size}", str(disk)], check=True)

    yield disk, resize
    subprocess.run(["umount", "-l", str(disk)], check=True)


def one_error_line(proc) -> str:
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line) for line in proc.stderr.splitlines()]  # bars' cursor moves
    lines = [line for line in lines if line.strip() and not re.match(r"(train|eval|tokenizing|Writing)", line)]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def leftovers(run: Path) -> list:
    return [p for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_resume_continues_from_it(small_disk, reference):
    disk, resize = small_disk
    resize("36M")  # the first checkpoint (24 MB) fits, the second does not
    args = [*RUN, f"cache_dir={disk}", "exp_name=run"]
    line = one_error_line(launch(args, check=False))
    run = disk / "run"
    assert f"could not save checkpoint {run}/checkpoints/step-4: No space left on device" in line, line
    assert f"the last complete checkpoint is {run}/checkpoints/step-2" in line and "resume=auto" in line
    assert (run / "checkpoints" / "step-2" / "COMPLETE").is_file() and not leftovers(run)
    resize("300M")  # space freed
    resumed = launch([*args, "resume=auto"])
    assert f"resumed from {run}/checkpoints/step-2 at step 2" in resumed.stdout
    assert_same_run(run, reference)


def test_disk_full_while_writing_final_leaves_no_partial_final(small_disk, reference):
    disk, resize = small_disk
    resize("28M")  # the one checkpoint (24 MB) fits, FINAL (9 MB) does not
    args = [*RUN, "save_every=160", "keep_last_n_checkpoints=1", f"cache_dir={disk}", "exp_name=run"]
    line = one_error_line(launch(args, check=False))
    run = disk / "run"
    assert f"could not save {run}/FINAL: " in line and "No space left on device" in line, line
    assert f"the last complete checkpoint is {run}/checkpoints/step-10" in line
    assert not (run / "FINAL").exists() and not leftovers(run)
    resize("300M")
    resumed = launch([*args, "resume=auto"])
    assert f"resumed from {run}/checkpoints/step-10" in resumed.stdout
    assert_same_run(run, reference)


def test_read_only_cache_dir_is_one_line(small_disk):
    disk, resize = small_disk
    (disk / "run").mkdir()
    resize("1M", mode="ro")
    for exp_name in ("run", "new"):  # an existing run dir, and one that cannot be created
        line = one_error_line(launch([*TINY, f"cache_dir={disk}", f"exp_name={exp_name}"], check=False))
        assert f"cannot write in the run dir {disk}/{exp_name}: Read-only file system" in line, line


def test_fault_drill_of_random_kills_ends_bit_identical(tmp_path):
    """scripts/fault_drill.py, small: random SIGKILLs, each followed by resume=auto."""
    proc = subprocess.run([PYTHON, "scripts/fault_drill.py", "--kills", "3", "--n_train", "192", "--workdir",
                           str(tmp_path)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "FINAL weights bit-identical to the uninterrupted run" in proc.stdout
    assert "| where the kill landed | kills |" in proc.stdout
