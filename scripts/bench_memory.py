"""Per-process memory of DDP and FSDP2 (train/sharding.py), each on 2 processes.

scripts/benchmark.py runs this (section `sharding`); each side is one `accelerate launch` of this
file with accelerate_config/ddp_cpu_2proc.yaml or fsdp_cpu_2proc.yaml:
    accelerate launch --config_file accelerate_config/fsdp_cpu_2proc.yaml scripts/bench_memory.py --spec '{...}'
Every process builds the trainer exactly as launch.py does (train.build.build), takes ONE
optimizer step (so AdamW has allocated its moments), and reports:
- param_bytes: this process's parameters (its shards under FSDP);
- optimizer_bytes: this process's optimizer state (its shards under FSDP);
- peak_rss_mb: the process's peak resident memory, everything included (the full model is loaded
  on every process before it is sharded, so this is NOT halved by FSDP on CPU);
and the main process prints `RESULT {json}` with each process's figures.

Spec keys: model (config group), model_path, train_file, test_file (JSONL), max_length, batch_size, threads,
workdir (the cache dir, shared by both processes; compare() makes one per side).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIGS = {"ddp": "accelerate_config/ddp_cpu_2proc.yaml", "fsdp": "accelerate_config/fsdp_cpu_2proc.yaml"}


def tensor_bytes(tensors) -> int:
    from train.sharding import local
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def measure(spec: dict, workdir: str) -> dict:
    from accelerate.utils import gather_object
    from hydra import compose, initialize_config_dir

    from train.build import build
    from train.config import register

    register()
    bs = spec["batch_size"]
    overrides = [f"cache_dir={workdir}", "exp_name=memory", "datasets=[jsonl]",
                 f"++datasets.jsonl.path={spec['train_file']}", f"++datasets.jsonl.test_path={spec['test_file']}",
                 "n_eval_examples=2", f"model={spec['model']}", f"model.name_or_path={spec['model_path']}",
                 f"model.max_length={spec['max_length']}", f"model.max_prompt_length={spec['max_length'] // 2}",
                 f"batch_size={bs}", f"microbatch_size={bs // 2}", "do_first_eval=false", "wandb.enabled=false"]
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=overrides)
    trainer = build(cfg)
    trainer.train_step(iter(trainer.train_loader()))
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if hasattr(t, "numel") and t.dim() > 0]
    mine = {"rank": trainer.rank, "param_bytes": tensor_bytes(trainer.model.parameters()),
            "optimizer_bytes": tensor_bytes(state),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    everyone = gather_object([mine])
    trainer.cleanup()
    return {"parallelism": trainer.parallelism, "world_size": trainer.world, "processes": everyone}


def run(kind: str, spec: dict, timeout: float = None) -> dict:
    """One side (ddp or fsdp) on 2 processes; its RESULT, or {"error": the last line of stderr}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    argv = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", CONFIGS[kind],
            "--num_cpu_threads_per_process", str(spec["threads"]), __file__, "--spec", json.dumps(spec)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def compare(spec: dict, timeout: float = None) -> dict:
    """Both sides, and fsdp / ddp of the largest process's parameters + optimizer state."""
    sides = {}
    for kind in CONFIGS:
        with tempfile.TemporaryDirectory() as workdir:
            sides[kind] = run(kind, dict(spec, workdir=workdir), timeout)
    out = {"runs": sides}
    if not any("error" in side for side in sides.values()):
        worst = {kind: max(p["param_bytes"] + p["optimizer_bytes"] for p in side["processes"])
                 for kind, side in sides.items()}
        out["param_optimizer_mb"] = {kind: b / 2 ** 20 for kind, b in worst.items()}
        out["fsdp_over_ddp"] = worst["fsdp"] / worst["ddp"]
        out["peak_rss_mb"] = {kind: max(p["peak_rss_mb"] for p in side["processes"]) for kind, side in sides.items()}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the setup as JSON (see the module docstring)")
    spec = json.loads(parser.parse_args(argv).spec)
    result = measure(spec, spec["workdir"])  # one dir for both processes: the run dir is shared
    if result["processes"] and int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
