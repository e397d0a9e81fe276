"""Exact resume after SIGKILL at several points, atomic checkpoints, preemption, non-finite values."""
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, ROOT, TINY, accelerate_launch, env, final_metrics, final_weights, launch, metrics

# 12 steps of 16 pairs; checkpoints every 2 steps, evals every 3 steps.
RUN = [*TINY, "save_every=32", "eval_every=48", "lr=1e-3"]
TIMING = ("pairs_per_s", "tokens_per_s", "train_seconds")


def comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("ref"))
    launch([*RUN, f"cache_dir={cache}", "exp_name=ref"])
    return Path(cache) / "ref"


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
    assert f"ignoring incomplete checkpoint {torn}" in resumed.stdout
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


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pairs(n, margin_at=()):
    rows = []
    for i in range(n):
        row = {"prompt": f"what is {i} plus one?", "chosen": f"it is {i + 1}.", "rejected": f"it is {i + 5}."}
        if i in margin_at:
            row["margin"] = 1e39  # finite in JSON, inf in fp32: a non-finite loss
        rows.append(row)
    return rows


def test_nonfinite_loss_stops_with_step_and_last_checkpoint(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pairs(200, margin_at={150, 151, 152}))
    args = ["model=tiny-llama", "datasets=[jsonl]", f"++datasets.jsonl.path={data}", "batch_size=8",
            "microbatch_size=8", "save_every=8", f"cache_dir={tmp_path}", "exp_name=nan", "n_eval_examples=20"]
    proc = launch(args, check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]  # after the progress bar
    assert "Traceback" not in proc.stderr and line.startswith("error: ")
    assert "non-finite loss or gradient at step" in line and "last good checkpoint:" in line and "step-" in line
    assert not (tmp_path / "nan" / "FINAL").exists()
    skip = launch([*args, "exp_name=nan-skip", "on_nonfinite=skip"])
    final = final_metrics(tmp_path / "nan-skip")
    assert 1 <= final["skipped_steps"] <= 3
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "nan-skip").values())
    assert skip.returncode == 0


def test_nonfinite_weights_are_never_written_as_final(tmp_path):
    args = [*TINY, "lr=inf", "on_nonfinite=skip", "warmup=0", f"cache_dir={tmp_path}",
            "exp_name=blowup", "optimizer=SGD"]
    proc = launch(args, check=False)
    assert proc.returncode == 2 and "non-finite weights" in proc.stderr
    assert not (tmp_path / "blowup" / "FINAL").exists()
