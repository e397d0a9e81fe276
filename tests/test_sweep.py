"""Hydra multirun sweeps end to end: one run dir per job, the summary, failures, resume, optuna,
distributed jobs and wandb grouping; plus the summary's ranking rules on hand-made job dirs."""
import csv
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.build import threads_per_job
from train.resolvers import job_subdir
from train.sweep import summarize, write_summary
from tests.conftest import PORT, env, python

ROOT = Path(__file__).resolve().parent.parent
# A random 2-layer Llama on 128 pairs: 4 optimizer steps of 32 pairs, a few seconds per job.
TINY = ["model=tiny-llama", "datasets.synthetic.n_train=128", "datasets.synthetic.n_test=32"]
METRIC_COLUMNS = ("accuracy", "loss", "margin")


def run(args, check=True, script="launch.py"):
    proc = python([script, *args])
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def jobs(sweep_dir):
    return sorted(p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml"))


def final(job):
    return json.loads((job / "FINAL" / "metrics.json").read_text())


def params(job):
    return dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))


def csv_rows(sweep_dir):
    with open(Path(sweep_dir) / "summary.csv") as f:
        return list(csv.DictReader(f))


def markdown_rows(sweep_dir):
    lines = (Path(sweep_dir) / "summary.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[1:]]


def assert_summary_matches_finals(sweep_dir, swept):
    """The CSV holds every job's FINAL metrics exactly; the best row is the top accuracy (then loss)."""
    rows = {r["job"]: r for r in csv_rows(sweep_dir)}
    done = [job for job in jobs(sweep_dir) if (job / "FINAL" / "COMPLETE").exists()]
    for job in done:
        row, metrics = rows[job.name], final(job)
        assert row["status"] == "done"
        for key in (*METRIC_COLUMNS, *[k for k in metrics if k.startswith("accuracy/")]):
            assert float(row[key]) == metrics[key], (job.name, key)
        for key in swept:
            assert row[key] == params(job)[key]
        assert float(row["wall_time_s"]) > 0
    best = max(done, key=lambda job: (final(job)["accuracy"], -final(job)["loss"]))
    assert [name for name, r in rows.items() if r["best"] == "1"] == [best.name]
    marked = [r for r in markdown_rows(sweep_dir) if r["best"] == "**best**"]
    assert len(marked) == 1 and all(marked[0][key] == params(best)[key] for key in swept)
    assert (Path(sweep_dir) / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rows


# ---- a 2x2 grid, then the same sweep again --------------------------------------------------------
@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """lr x loss.center_rewards_coefficient, two jobs at a time (joblib)."""
    cache = tmp_path_factory.mktemp("grid")
    args = [*TINY, f"cache_dir={cache}", "exp_name=grid", "lr=1e-4,1e-3", "loss.center_rewards_coefficient=0,0.01"]
    proc = run(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *args])
    return cache / "grid", args, proc


def test_grid_sweep_writes_one_run_dir_per_job_and_a_correct_summary(grid):
    sweep_dir, _, _ = grid
    found = jobs(sweep_dir)
    assert len(found) == 4
    settings = {(params(j)["lr"], params(j)["loss.center_rewards_coefficient"]) for j in found}
    assert settings == {("0.0001", "0"), ("0.0001", "0.01"), ("0.001", "0"), ("0.001", "0.01")}
    for job in found:
        for path in ("FINAL/COMPLETE", "FINAL/model.safetensors", "config.yaml", "metrics.jsonl"):
            assert (job / path).is_file(), (job.name, path)
        # the job really ran with its own overrides, in its own dir
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert str(config["lr"]) == str(float(params(job)["lr"])) and config["local_run_dir"] == str(job)
        assert json.loads((job / "job_status.json").read_text())["state"] == "completed"
    rows = assert_summary_matches_finals(sweep_dir, ["lr", "loss.center_rewards_coefficient"])
    assert len(rows) == 4 and {r["status"] for r in rows.values()} == {"done"}
    assert len(markdown_rows(sweep_dir)) == 4

    # on demand, the CLI writes the same summary again
    before = (sweep_dir / "summary.csv").read_text()
    for name in ("summary.csv", "summary.md", "summary.png"):
        (sweep_dir / name).unlink()
    out = run([str(sweep_dir)], script="scripts/summarize_sweep.py").stdout
    assert (sweep_dir / "summary.csv").read_text() == before and "**best**" in out
    assert (sweep_dir / "summary.png").exists() and (sweep_dir / "summary.md").exists()


def test_rerun_with_resume_auto_skips_finished_jobs_and_a_plain_rerun_refuses(grid):
    sweep_dir, args, _ = grid
    stamps = {job: (job / "FINAL" / "metrics.json").stat().st_mtime_ns for job in jobs(sweep_dir)}
    best_before = [r["job"] for r in csv_rows(sweep_dir) if r["best"] == "1"]

    proc = run(["-m", *args, "resume=auto"])
    assert proc.stdout.count("run already finished, nothing to do") == 4
    assert jobs(sweep_dir) == sorted(stamps)  # the same dirs: resume stays out of the dir names
    assert {job: (job / "FINAL" / "metrics.json").stat().st_mtime_ns for job in stamps} == stamps
    rows = csv_rows(sweep_dir)
    assert [r["job"] for r in rows if r["best"] == "1"] == best_before
    assert all(r["status"] == "done" and "skipped" in r["note"] for r in rows)

    # Without resume=auto every job refuses to overwrite its FINAL; the summary says so.
    proc = run(["-m", *args], check=False)
    assert proc.returncode != 0
    assert {job: (job / "FINAL" / "metrics.json").stat().st_mtime_ns for job in stamps} == stamps
    rows = csv_rows(sweep_dir)
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    assert all("already holds a finished run (FINAL)" in r["note"] for r in rows)
    assert_summary_matches_finals(sweep_dir, ["lr", "loss.center_rewards_coefficient"])


# ---- a failing job, with wandb on -----------------------------------------------------------------
def wandb_run_record(run_dir):
    """The run record of a wandb offline run: its .wandb file is a log of protobuf records in
    32 KiB blocks, each record behind a 7-byte header (crc, length, type: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = next(Path(run_dir).glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {run_dir}")


def test_a_failing_job_is_reported_and_the_others_finish_each_its_own_wandb_run(tmp_path):
    # batch_size=24 is not a whole number of microbatches of 16: that job fails before loading a model.
    args = ["-m", *TINY, f"cache_dir={tmp_path}", "exp_name=failing", "wandb.enabled=true", "wandb.mode=offline",
            "batch_size=16,24,32"]
    proc = run(args, check=False)
    assert proc.returncode != 0  # Hydra reports the failed job once every job has run
    sweep_dir = tmp_path / "failing"
    by_batch = {params(job)["batch_size"]: job for job in jobs(sweep_dir)}
    # ... in one line that points at the summary, with no traceback
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: job {by_batch['24'].name} failed: batch_size (24) must be microbatch_size (16) x "
                      f"processes (1) x a whole number of accumulation steps; every job's outcome: "
                      f"{sweep_dir / 'summary.md'}"], errors
    # a single run and a sweep never share a dir
    single = run([*TINY, f"cache_dir={tmp_path}", "exp_name=failing"], check=False)
    assert single.returncode == 2 and single.stderr.endswith(
        f"error: {sweep_dir} holds a sweep (multirun.yaml): choose another exp_name for a single run, or rerun the "
        "sweep with -m\n"), single.stderr
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "metrics.jsonl").write_text("")
    sweep_over_run = run(["-m", *TINY, f"cache_dir={tmp_path}", "exp_name=single", "lr=1e-3,2e-3"], check=False)
    assert sweep_over_run.returncode == 2 and f"error: {tmp_path / 'single'} holds a single run (not a sweep)" in \
        sweep_over_run.stderr, sweep_over_run.stderr
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["metrics.jsonl"]
    # each job's launch.log keeps its messages: the failed one its error, the others their final line
    assert "[ERROR] - batch_size (24)" in (by_batch["24"] / "launch.log").read_text()
    assert "final eval accuracy" in (by_batch["16"] / "launch.log").read_text()
    assert sorted(by_batch) == ["16", "24", "32"]
    assert (by_batch["16"] / "FINAL" / "COMPLETE").exists() and (by_batch["32"] / "FINAL" / "COMPLETE").exists()
    assert not (by_batch["24"] / "FINAL").exists()

    rows = {r["batch_size"]: r for r in csv_rows(sweep_dir)}
    assert rows["24"]["status"] == "failed" and rows["16"]["status"] == rows["32"]["status"] == "done"
    assert rows["24"]["note"].startswith("batch_size (24) must be microbatch_size (16)")
    assert rows["24"]["best"] == "0" and rows["24"]["accuracy"] == ""
    assert_summary_matches_finals(sweep_dir, ["batch_size"])
    markdown = (sweep_dir / "summary.md").read_text()
    assert "3 jobs, 2 done, 1 failed" in markdown
    assert "failed: batch_size (24) must be microbatch_size (16)" in markdown

    # wandb: one offline run per finished job, grouped by the sweep, named after the job
    runs = {size: wandb_run_record(next((by_batch[size] / "wandb").glob("offline-run-*"))) for size in ("16", "32")}
    assert {r.run_group for r in runs.values()} == {"failing"}
    assert runs["16"].run_id != runs["32"].run_id
    assert runs["16"].display_name == f"failing/{by_batch['16'].name}"
    assert runs["32"].display_name == f"failing/{by_batch['32'].name}"


# ---- optuna ----------------------------------------------------------------------------------------
def test_optuna_sweep_of_three_trials_maximises_final_accuracy(tmp_path):
    run(["-m", "hydra/sweeper=optuna_accuracy", "hydra.sweeper.n_trials=3", *TINY, f"cache_dir={tmp_path}",
         "exp_name=study", "lr=tag(log, interval(1e-5, 1e-2))", "loss.center_rewards_coefficient=choice(0, 0.01)",
         "resume=auto"])
    sweep_dir = tmp_path / "study"
    trials = jobs(sweep_dir)
    # three trials, three dirs: a continuous lr is never drawn twice
    assert len(trials) == 3 and all((job / "FINAL" / "COMPLETE").exists() for job in trials)
    assert len({params(job)["lr"] for job in trials}) == len(trials)
    assert_summary_matches_finals(sweep_dir, ["lr", "loss.center_rewards_coefficient"])
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert result["best_value"] == max(final(job)["accuracy"] for job in trials)


def test_optuna_sweep_that_would_minimise_accuracy_is_refused(tmp_path):
    proc = run(["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1", *TINY, f"cache_dir={tmp_path}",
                "lr=interval(1e-5, 1e-3)"], check=False)
    assert proc.returncode == 2 and "hydra/sweeper=optuna_accuracy" in proc.stderr
    assert "Traceback" not in proc.stderr and not jobs(tmp_path / "reward-model")


# ---- distributed jobs -------------------------------------------------------------------------------
def test_each_job_of_a_sweep_runs_on_two_processes_with_the_accelerate_launcher(tmp_path):
    run(["-m", "hydra/launcher=accelerate", "hydra.launcher.config_file=accelerate_config/ddp_cpu_2proc.yaml",
         f"hydra.launcher.main_process_port={PORT}",
         *TINY, f"cache_dir={tmp_path}", "exp_name=ddp", "lr=1e-4,1e-3"])
    sweep_dir = tmp_path / "ddp"
    found = jobs(sweep_dir)
    assert sorted(params(job)["lr"] for job in found) == ["0.0001", "0.001"]
    for job in found:
        assert final(job)["world_size"] == 2
        train = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert {r["world_size"] for r in train} == {2}
        # the job dir keeps the sweep's record of the job, not the child's single-run overrides
        assert "local_run_dir" not in (job / ".hydra" / "overrides.yaml").read_text()
    rows = assert_summary_matches_finals(sweep_dir, ["lr"])
    assert len(rows) == 2


def test_accelerate_launcher_passes_job_dirs_and_errors_through_intact():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.accelerate_launcher.accelerate_launcher import _last_error, _quoted

    for value in ["/tmp/sweep/lr=0.001,model=tiny-llama", "/tmp/it's here"]:
        assert OverridesParser.create().parse_override(f"local_run_dir={_quoted(value)}").value() == value
    # both processes print the same one-line error, sometimes onto one line
    assert _last_error("data: ...\nerror: bad value\rerror: bad value\n") == "bad value"
    assert _last_error("error: config error: Key 'x' not in 'Config'\n") == "config error: Key 'x' not in 'Config'"
    crash = "Traceback (most recent call last):\n  File ...\nRuntimeError: boom\n=====\n  exitcode: 1\n"
    assert _last_error(crash) == "RuntimeError: boom"


def test_slurm_preset_composes():
    proc = run(["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu", "--cfg", "hydra", "-p", "hydra.launcher"])
    launcher = yaml.safe_load(proc.stdout)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 1 and launcher["cpus_per_task"] == 8


# ---- units: dir names, threads, ranking ------------------------------------------------------------
def test_job_subdir_is_one_safe_path_component_and_unique():
    assert job_subdir("lr=0.001,model=tiny-llama") == "lr=0.001,model=tiny-llama"
    assert job_subdir("model.name_or_path=org/model") == "model.name_or_path=org%2Fmodel"
    assert job_subdir("a=%2F") != job_subdir("a=/")
    assert job_subdir("") == "defaults"
    long_a, long_b = "x=" + "a" * 300, "x=" + "a" * 299 + "b"
    assert len(job_subdir(long_a).encode()) <= 200 and job_subdir(long_a) != job_subdir(long_b)
    assert job_subdir(long_a) == job_subdir(long_a)  # the same sweep finds the same dirs again


def test_threads_per_job_split_the_cores_between_parallel_jobs():
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert threads_per_job({"_target_": joblib, "n_jobs": 2}, cpus=16) == 8
    assert threads_per_job({"_target_": joblib, "n_jobs": -1}, cpus=16) == 1
    assert threads_per_job({"_target_": joblib, "n_jobs": 64}, cpus=16) == 1
    submitit = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    assert threads_per_job({"_target_": submitit, "cpus_per_task": 3}) == 3
    assert threads_per_job({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}) is None


def fake_job(sweep_dir, name, overrides, metrics=None, state="completed", error=None):
    job = Path(sweep_dir) / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "job_status.json").write_text(json.dumps({"state": state, "error": error, "wall_time_s": 1.0}))
    if metrics is not None:
        (job / "FINAL").mkdir()
        (job / "FINAL" / "metrics.json").write_text(json.dumps(metrics))
        (job / "FINAL" / "COMPLETE").write_text("")


def test_best_is_highest_accuracy_then_lowest_loss_and_unfinished_jobs_never_win(tmp_path):
    fake_job(tmp_path, "lr=1", ["lr=1"], {"accuracy": 0.75, "loss": 0.50, "margin": 1.0})
    fake_job(tmp_path, "lr=2", ["lr=2"], {"accuracy": 0.75, "loss": 0.40, "margin": 1.0})
    fake_job(tmp_path, "lr=3", ["lr=3"], {"accuracy": 0.50, "loss": 0.10, "margin": 1.0})
    fake_job(tmp_path, "lr=4", ["lr=4"], state="failed", error="boom")
    fake_job(tmp_path, "lr=5", ["lr=5"], state="running")
    summary = write_summary(tmp_path)
    assert summary["best"]["job"] == "lr=2"
    assert [r["job"] for r in summary["rows"]] == ["lr=2", "lr=1", "lr=3", "lr=4", "lr=5"]
    assert [r["status"] for r in summary["rows"]] == ["done", "done", "done", "failed", "running"]
    assert summarize(tmp_path, sweep_over=True)["rows"][-1]["status"] == "interrupted"
    assert [r["best"] for r in csv_rows(tmp_path)] == ["1", "0", "0", "0", "0"]


def test_a_swept_loss_group_gets_its_own_column_and_defaults_are_filled_in(tmp_path):
    # jobs of two sweep commands in one dir: one swept loss=hinge, the other left the loss group default
    fake_job(tmp_path, "lr=1", ["lr=1"], {"accuracy": 0.75, "loss": 0.50, "margin": 1.0})
    fake_job(tmp_path, "loss=hinge,lr=1", ["loss=hinge", "lr=1"], {"accuracy": 0.50, "loss": 0.40, "margin": 1.0})
    (tmp_path / "lr=1" / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": {"loss": "bradley-terry"}},
                   "job": {"config": {"override_dirname": {"exclude_keys": []}}}}}))
    write_summary(tmp_path)
    rows = csv_rows(tmp_path)
    assert [(r["loss_override"], r["loss"]) for r in rows] == [("bradley-terry", "0.5"), ("hinge", "0.4")]
    assert "**Best** (highest final eval accuracy, ties to the lower loss): `loss=bradley-terry`" in \
        (tmp_path / "summary.md").read_text()


def test_one_ctrl_c_stops_the_whole_sweep_and_resume_auto_finishes_it(tmp_path):
    import signal
    import time
    # The first job is long (50 steps), so the signal lands in it, far from its end; the two it stops
    # from starting are short (8 and 12 steps): after the resume they only have to finish.
    args = ["-m", "model=tiny-llama", "datasets.synthetic.n_test=16",
            "n_eval_examples=16", "batch_size=8", "microbatch_size=8", "eval_every=100000", "do_first_eval=false",
            f"cache_dir={tmp_path}", "exp_name=stop", "datasets.synthetic.n_train=400,64,96"]
    proc = subprocess.Popen([sys.executable, "launch.py", *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(len(p.read_text().splitlines()) >= 3
                                             for p in (tmp_path / "stop").glob("*/metrics.jsonl")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    sweep = tmp_path / "stop"
    started = [j for j in jobs(sweep) if (j / "metrics.jsonl").exists()]
    assert len(started) == 1 and not (started[0] / "FINAL").exists(), out[-2000:]
    assert list((started[0] / "checkpoints").glob("step-*"))  # the interrupted job saved where it was
    assert "earlier job of this sweep was stopped by a signal" in (sweep / "summary.md").read_text()
    # both later jobs were refused, not only the next one
    assert sum("earlier job of this sweep was stopped by a signal" in r["note"] for r in csv_rows(sweep)) == 2
    assert sorted(r["status"] for r in csv_rows(sweep)) == ["not started", "not started", "unfinished"]
    assert "Traceback" not in out and re.search(r"^error: job \S+ not started: an earlier job of this sweep was "
                                                r"stopped by a signal; rerun with resume=auto; every job's", out, re.M), out
    run([*args, "resume=auto"])
    assert len([j for j in jobs(sweep) if (j / "FINAL" / "COMPLETE").is_file()]) == 3
