"""Exact resume after SIGKILL at several points, atomic checkpoints, preemption, non-finite values."""
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, ROOT, SHARED_RUN, TINY, accelerate_launch, env, final_metrics, final_weights, launch, metrics

RUN = SHARED_RUN  # the runs here are interrupted copies of the shared one
TIMING = ("pairs_per_s", "tokens_per_s", "train_seconds")


def comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture
def reference(shared_run):
    """The uninterrupted run (write_predictions changes neither its metrics nor its weights)."""
    return shared_run


def assert_same_run(run, reference):
    w, ref = final_weights(run), final_weights(reference)
    assert all(torch.equal(w[k], ref[k]) for k in ref), "FINAL weights differ from the uninterrupted run"
    got, want = metrics(run), metrics(reference)
    steps = [r["step"] for r in got if r["split"] == "train"]
    assert steps == list(range(1, 13)), steps  # no step missing or repeated
    assert comparable(got) == comparable(want)


@pytest.mark.parametrize("kill_at", ["mid_step:5", "after_step:7", "eval:3"])
def test_sigkill_then_resume_auto_is_bit_identical(tmp_path, reference, kill_at):
    cache = str(tmp_path)
    killed = launch([*RUN, f"cache_dir={cache}", "exp_name=run"], check=False,
                    extra_env={"REWARD_HARNESS_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL
    run = Path(cache) / "run"
    assert not (run / "FINAL").exists()
    resumed = launch([*RUN, f"cache_dir={cache}", "exp_name=run", "resume=auto"])
    assert "resumed from" in resumed.stdout
    assert_same_run(run, reference)


def test_kill_before_any_checkpoint_restarts_without_duplicate_records(tmp_path, reference):
    cache = str(tmp_path)
    args = [a for a in RUN if not a.startswith("save_every")]
    killed = launch([*args, f"cache_dir={cache}", "exp_name=run"], check=False,
                    extra_env={"REWARD_HARNESS_KILL_AT": "after_step:5"})
    assert killed.returncode == -signal.SIGKILL and len(metrics(Path(cache) / "run")) > 5
    launch([*args, f"cache_dir={cache}", "exp_name=run", "resume=auto"])  # nothing to resume: a fresh start
    assert_same_run(Path(cache) / "run", reference)


def test_resume_is_exact_with_dropout_on(tmp_path):
    cache = str(tmp_path)
    args = [*RUN, "model.disable_dropout=false", "+model.init_config.attention_dropout=0.3",
            "+model.init_config.hidden_dropout=0.3", f"cache_dir={cache}"]
    launch([*args, "exp_name=ref"])
    launch([*args, "exp_name=run"], check=False, extra_env={"REWARD_HARNESS_KILL_AT": "after_step:7"})
    launch([*args, "exp_name=run", "resume=auto"])
    assert_same_run(Path(cache) / "run", Path(cache) / "ref")


def test_kill_during_save_leaves_previous_checkpoint_and_resume_uses_it(tmp_path, reference):
    cache = str(tmp_path)
    killed = launch([*RUN, f"cache_dir={cache}", "exp_name=run"], check=False,
                    extra_env={"REWARD_HARNESS_KILL_AT": "save:2"})
    assert killed.returncode == -signal.SIGKILL
    root = Path(cache) / "run" / "checkpoints"
    assert (root / "step-2" / "COMPLETE").is_file()
    torn = root / ".tmp-step-4"
    assert torn.is_dir() and (torn / "model.safetensors").is_file() and not (torn / "COMPLETE").exists()
    resumed = launch([*RUN, f"cache_dir={cache}", "exp_name=run", "resume=auto"])
    assert f"removing {torn}: left by a save that did not finish" in resumed.stdout and not torn.exists()
    assert "resumed from" in resumed.stdout and "step-2 at step 2" in resumed.stdout
    assert_same_run(Path(cache) / "run", reference)


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


def test_resume_from_explicit_path_and_refusal_to_overwrite(tmp_path, reference):
    cache = str(tmp_path)
    launch([*RUN, f"cache_dir={cache}", "exp_name=run"], check=False, extra_env={"REWARD_HARNESS_KILL_AT": "after_step:9"})
    again = launch([*RUN, f"cache_dir={cache}", "exp_name=run"], check=False)
    assert again.returncode == 2 and "already holds checkpoints: pass resume=auto" in again.stderr
    changed = launch([*RUN, f"cache_dir={cache}", "exp_name=run", "resume=auto", "lr=2e-3"], check=False)
    assert changed.returncode == 2 and "'lr' was 0.001 in the checkpointed run, now 0.002" in changed.stderr
    step4 = Path(cache) / "run" / "checkpoints" / "step-8"
    launch([*RUN, f"cache_dir={cache}", "exp_name=run", f"resume={step4}"])
    assert_same_run(Path(cache) / "run", reference)
    done = launch([*RUN, f"cache_dir={cache}", "exp_name=run"], check=False)
    assert done.returncode == 2 and "already holds FINAL" in done.stderr
    skip = launch([*RUN, f"cache_dir={cache}", "exp_name=run", "resume=auto"])
    assert "run already finished" in skip.stdout


def test_two_process_kill_and_resume_matches_uninterrupted_two_process_run(tmp_path):
    cache = str(tmp_path)
    args = [*RUN, "microbatch_size=4", f"cache_dir={cache}"]
    accelerate_launch([*args, "exp_name=ref2"])
    killed = accelerate_launch([*args, "exp_name=run2"], check=False, extra_env={"REWARD_HARNESS_KILL_AT": "after_step:5"})
    assert killed.returncode != 0
    accelerate_launch([*args, "exp_name=run2", "resume=auto"])
    run, ref = Path(cache) / "run2", Path(cache) / "ref2"
    assert final_metrics(run)["world_size"] == 2
    assert sorted(p.name for p in (run / "checkpoints" / "step-10").glob("rng-*")) == ["rng-0.pt", "rng-1.pt"]
    assert_same_run(run, ref)


def test_wandb_run_id_survives_a_resume(tmp_path):
    cache = str(tmp_path)
    args = [*RUN, f"cache_dir={cache}", "exp_name=wb", "wandb.enabled=true", "wandb.mode=offline"]
    launch(args, check=False, extra_env={"REWARD_HARNESS_KILL_AT": "after_step:7"})
    state = json.loads((Path(cache) / "wb" / "checkpoints" / "step-6" / "state.json").read_text())
    assert state["wandb_id"]
    launch([*args, "resume=auto"])
    runs = sorted((Path(cache) / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(state["wandb_id"]) for r in runs)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_saves_and_exits_cleanly(tmp_path, sig):
    cache = str(tmp_path)
    args = ["model=tiny-llama", "datasets.synthetic.n_train=800", "datasets.synthetic.n_test=32",
            "n_eval_examples=32", "batch_size=8", "microbatch_size=4", "eval_every=100000", "do_first_eval=false",
            f"cache_dir={cache}", "exp_name=pre"]
    proc = subprocess.Popen([PYTHON, "launch.py", *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    path = Path(cache) / "pre" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (path.exists() and len(path.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "resume=auto" in out
    run = Path(cache) / "pre"
    assert not (run / "FINAL").exists()
    (ckpt,) = list((run / "checkpoints").glob("step-*"))
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert 3 <= step < 100
    assert [r["step"] for r in metrics(run)] == list(range(1, step + 1))
    launch([*args, "resume=auto"])
    train = [r["step"] for r in metrics(run) if r["split"] == "train"]
    assert train == list(range(1, 101)) and (run / "FINAL" / "COMPLETE").is_file()


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
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not re.match(r"(train|tokenizing|Writing)", line)]
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
