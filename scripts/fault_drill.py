"""Fault drill: SIGKILL a training run at random moments, resume it each time, check the result.

    .venv/bin/python scripts/fault_drill.py --kills 10            # about 3 minutes on 2 CPU cores
    .venv/bin/python scripts/fault_drill.py --kills 5 --nproc 2   # 2 CPU processes (DDP over gloo)

A tiny-llama run that saves a checkpoint after every step and evaluates every 3 steps is trained
once without interruption. Then the same run is started with resume=auto and killed with SIGKILL
after a random delay, again and again, and finally left to finish. The trainer reports its phase
(step, eval, save) through REWARD_HARNESS_PHASE_FILE (train/faults.py), so the drill can say where
each kill landed. It passes (exit 0) when the FINAL weights are bit-identical to the uninterrupted
run's, the metrics hold every step exactly once, and no temporary file is left in the run dir.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_args(args, cache: str, exp_name: str) -> list:
    return ["model=tiny-llama", f"datasets.synthetic.n_train={args.n_train}", "datasets.synthetic.n_test=48",
            "n_eval_examples=48", "batch_size=16", "microbatch_size=8" if args.nproc == 1 else "microbatch_size=4",
            "save_every=16", "eval_every=48", "lr=1e-3", f"cache_dir={cache}", f"exp_name={exp_name}"]


def command(args, overrides: list) -> list:
    if args.nproc == 1:
        return [sys.executable, "launch.py", *overrides]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--config_file", "accelerate_config/ddp_cpu_2proc.yaml", "launch.py", *overrides]


def environment(phase_file: str = "") -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false")
    env.pop("REWARD_HARNESS_KILL_AT", None)
    if phase_file:
        env["REWARD_HARNESS_PHASE_FILE"] = phase_file
    return env


def read_phase(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "startup"  # the trainer had not reached its loop yet


def reference_run(args, cache: str) -> float:
    """The uninterrupted run; returns the seconds its training loop took (model loading excluded)."""
    phase_file = Path(cache) / "phase"
    proc = subprocess.Popen(command(args, run_args(args, cache, "reference")), cwd=ROOT, env=environment(str(phase_file)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not phase_file.exists() and proc.poll() is None:
        time.sleep(0.05)
    start = time.time()
    while read_phase(phase_file) != "done" and proc.poll() is None:
        time.sleep(0.05)
    seconds = time.time() - start
    if proc.wait() != 0:
        raise SystemExit(f"the reference run failed (exit {proc.returncode})")
    return seconds


def kill_once(args, overrides: list, phase_file: Path, rng: random.Random, max_delay: float) -> str:
    """Start the run with resume=auto, kill it after a random delay; where it was, or 'finished'."""
    phase_file.unlink(missing_ok=True)
    proc = subprocess.Popen(command(args, [*overrides, "resume=auto"]), cwd=ROOT, env=environment(str(phase_file)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while not phase_file.exists() and proc.poll() is None:  # wait out imports and model loading
        time.sleep(0.05)
    time.sleep(rng.uniform(0, max_delay))
    if proc.poll() is not None:
        if proc.returncode != 0:
            raise SystemExit(f"the run failed on its own (exit {proc.returncode}):\n{proc.stderr.read()[-2000:]}")
        return "finished"
    phase = read_phase(phase_file)
    os.killpg(proc.pid, signal.SIGKILL)  # every process of the run, as a machine failure would
    proc.wait()
    return phase


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run / "FINAL" / "model.safetensors"))


def check(run: Path, reference: Path) -> list:
    """What differs from the uninterrupted run; empty when the drill passed."""
    import torch
    problems = []
    got, want = final_weights(run), final_weights(reference)
    if got.keys() != want.keys() or not all(torch.equal(got[k], want[k]) for k in want):
        problems.append("FINAL weights differ from the uninterrupted run")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    if steps != list(range(1, len(steps) + 1)):
        problems.append(f"metrics.jsonl train steps are not 1..N once each: {steps}")
    left = [str(p) for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    if left:
        problems.append(f"temporary files left behind: {left}")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs to land before letting the run finish")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays")
    parser.add_argument("--max_delay", type=float, default=None,
                        help="seconds after the loop starts, at most; default: twice the loop's length / kills")
    parser.add_argument("--n_train", type=int, default=384, help="training pairs (16 per step)")
    parser.add_argument("--nproc", type=int, choices=(1, 2), default=1)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    cache = args.workdir or tempfile.mkdtemp(prefix="fault-drill-")

    print(f"uninterrupted reference run in {cache}/reference ...", flush=True)
    loop_seconds = reference_run(args, cache)
    # Kills spread over the run: on average two per 1/kills of the loop's length, and every
    # restart resumes from the checkpoint of the step before, so the run still moves on.
    max_delay = args.max_delay if args.max_delay else 2 * loop_seconds / args.kills
    overrides = run_args(args, cache, "drill")
    landed = Counter()
    for attempt in range(1, args.kills + 1):
        phase = kill_once(args, overrides, Path(cache) / "phase", rng, max_delay)
        landed[phase] += 1
        print(f"kill {attempt}: {'the run had already finished' if phase == 'finished' else 'landed mid-' + phase}",
              flush=True)
        if phase == "finished":
            break
    subprocess.run(command(args, [*overrides, "resume=auto"]), cwd=ROOT, env=environment(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    problems = check(Path(cache) / "drill", Path(cache) / "reference")

    print("\n| where the kill landed | kills |\n|---|---|")
    for phase in ("startup", "step", "eval", "save", "done", "unknown", "finished"):
        if landed[phase]:
            print(f"| {phase} | {landed[phase]} |")
    print(f"\n{sum(v for k, v in landed.items() if k != 'finished')} kills, {args.nproc} process(es): "
          + ("FINAL weights bit-identical to the uninterrupted run, every step logged once, no temporary files left"
             if not problems else "FAILED: " + "; ".join(problems)))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
