"""FSDP2 (train/sharding.py) on 2 CPU processes over gloo: the same sharding code a GPU run uses.

One sharded run is killed and resumed, its twin runs through, and a DDP run is the reference;
the killed run's checkpoint is also resumed on 1 process, and that run's 1-process checkpoint
on 2 again. Eval has 41 pairs in batches of 4: 21 and 20 per process, 6 and 5 forwards, so the
process with fewer batches must keep up with the other's layer gathers or the run hangs.
"""
import json
import shutil
import subprocess

import torch

from tests.conftest import (LAUNCH, PYTHON, ROOT, TINY, env, final_metrics, final_weights, launch, main_in_process,
                            max_gap, metrics, python)
from train.label import main as label_main

FSDP = "accelerate_config/fsdp_cpu_2proc.yaml"
ARGS = [*TINY, "microbatch_size=4", "n_eval_examples=41", "eval_batch_size=4", "save_every=64", "lr=1e-3"]


def run(args, config=FSDP, nproc=None, kill_at=None, check=True, extra_env=None):
    extra = ["--num_processes", str(nproc)] if nproc else []
    proc = python([*LAUNCH, "--config_file", config, *extra, "launch.py", *ARGS, *args],
                  environ=env(**({"REWARD_HARNESS_KILL_AT": kill_at} if kill_at else {}), **(extra_env or {})))
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_sharded_training_matches_ddp_resumes_exactly_and_at_another_process_count(tmp_path, capsys):
    cache = f"cache_dir={tmp_path}"
    run([cache, "exp_name=fsdp"])
    run([cache, "exp_name=ddp"], config="accelerate_config/ddp_cpu_2proc.yaml")
    killed = run([cache, "exp_name=killed"], kill_at="after_step:6", check=False)
    assert killed.returncode != 0
    step4 = tmp_path / "killed" / "checkpoints" / "step-4"
    # Each process wrote its own shard; nothing was gathered into one weights file.
    assert sorted(p.name for p in (step4 / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (step4 / "model.safetensors").exists()
    shutil.copytree(tmp_path / "killed", tmp_path / "two_to_one")
    resumed = run([cache, "exp_name=killed", "resume=auto"])
    assert "resumed from" in resumed.stdout + resumed.stderr

    fsdp, ddp = final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "ddp")
    assert max_gap(fsdp, ddp) < 1e-4  # the same training, sharded or replicated
    killed_final = final_weights(tmp_path / "killed")
    assert all(torch.equal(fsdp[k], killed_final[k]) for k in fsdp)  # kill -9 + resume=auto: bit-identical

    for name, world in (("fsdp", 2), ("ddp", 2), ("killed", 2)):
        final = final_metrics(tmp_path / name)
        parallelism = "ddp" if name == "ddp" else "fsdp"
        assert final["world_size"] == world and final["parallelism"] == parallelism
        records = metrics(tmp_path / name)
        assert {(r["world_size"], r["parallelism"]) for r in records} == {(world, parallelism)}
        assert [r["n_pairs"] for r in records if r["split"] == "eval"][-1] == 41  # every eval pair, once

    # 2 -> 1: the 2-process shards resume on one process (resharded on load); not bit-exact
    # (the sums run in another order), but the same training.
    run([cache, "exp_name=two_to_one", "resume=auto"], nproc=1)
    one = final_weights(tmp_path / "two_to_one")
    assert max_gap(one, fsdp) < 1e-4
    assert {r["world_size"] for r in metrics(tmp_path / "two_to_one")} == {1, 2}

    # 1 -> 2: that run's last checkpoint, written by one process, resumed on two.
    one_to_two = tmp_path / "one_to_two"
    shutil.copytree(tmp_path / "two_to_one", one_to_two)
    shutil.rmtree(one_to_two / "FINAL")
    last = sorted((one_to_two / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))[-1]
    assert json.loads((last / "state.json").read_text())["step"] > 4  # written after the move to 1 process
    assert sorted(p.name for p in (last / "sharded").glob("*.distcp")) == ["__0_0.distcp"]
    run([cache, "exp_name=one_to_two", "resume=auto"])
    assert max_gap(final_weights(one_to_two), fsdp) < 1e-4

    # train.label reads a sharded checkpoint into the whole model, on one process: it scores as the
    # DDP run's checkpoint of the same step does.
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt": f"Question {i}?", "output": f"Answer {i * i}.",
                                           "prompt_id": i}) + "\n" for i in range(6)))
    rewards = {}
    for name in ("fsdp", "ddp"):
        out = tmp_path / f"{name}-labels.json"
        code, _, err = main_in_process(label_main, capsys, "--reward_model_path", tmp_path / name / "checkpoints" / "step-8",
                                       "--feedback_type", "scalar", samples, out)
        assert code == 0, err
        rewards[name] = torch.tensor([row["reward"] for row in json.loads(out.read_text())])
    assert (rewards["fsdp"] - rewards["ddp"]).abs().max() < 1e-4


def test_fsdp_version_1_is_refused_in_one_line(tmp_path):
    proc = launch([*TINY, f"cache_dir={tmp_path}"], check=False,
                  extra_env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    assert proc.returncode != 0
    assert "fsdp_version 1 is not supported: set fsdp_version: 2" in proc.stderr
    assert "Traceback" not in proc.stderr


OPTIONS = """
import copy, sys, torch, torch.distributed as dist
from types import SimpleNamespace
from train import sharding
from train.models import AutoModelForBradleyTerry

# One process, a group of one: sharding.shard as a run calls it, on settings as accelerate parses them.
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
tiny = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
ids = torch.randint(1, 100, (4, 12))
mask = torch.ones_like(ids)
mask[1, 7:] = 0
plain = AutoModelForBradleyTerry.from_config(tiny, pad_token_id=0)
plain(input_ids=ids, attention_mask=mask).sum().backward()
for precision in ("no", "bf16"):
    model = AutoModelForBradleyTerry.from_config(tiny, pad_token_id=0)
    settings = SimpleNamespace(cpu_offload=None, activation_checkpointing=True, transformer_cls_names_to_wrap=None,
                               reshard_after_forward=True)
    sharding.shard(model, settings, SimpleNamespace(device=torch.device("cpu"), num_processes=1, mixed_precision=precision))
    assert model.hf_model.is_gradient_checkpointing
    scores = model(input_ids=ids, attention_mask=mask)
    scores.sum().backward()
    want = plain(input_ids=ids, attention_mask=mask)
    tol = 1e-5 if precision == "no" else 3e-2
    assert scores.dtype == (torch.float32 if precision == "no" else torch.bfloat16), scores.dtype
    assert (scores.float() - want).abs().max() < tol, (precision, scores, want)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.dtype == torch.float32, (name, p.dtype)  # fp32 master weights
        grad = sharding.local(p.grad).float()
        assert (grad - q.grad).norm() <= tol * 10 * q.grad.norm() + 1e-6, (precision, name)
print("OK")
"""


def test_activation_checkpointing_and_bf16_over_fp32_master_weights():
    """fsdp_activation_checkpointing and mixed_precision bf16, through train/sharding.py: fp32 gives the
    unsharded scores and gradients; bf16 computes in bf16 while the weights stay fp32."""
    proc = subprocess.run([PYTHON, "-c", OPTIONS], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_nonfinite_sharded_weights_are_never_written_as_final(tmp_path):
    """The non-finite check on sharded parameters: the embedding's shards hold an inf after step 12
    (the last); the processes stop together with one line and none writes FINAL."""
    proc = run(["on_nonfinite=skip", f"cache_dir={tmp_path}", "exp_name=blowup", "save_every=null"], check=False,
               extra_env={"REWARD_HARNESS_INF_WEIGHTS_AT": 12})
    assert proc.returncode != 0 and "non-finite weights" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "blowup" / "FINAL").exists()
