"""Checkpoints: everything an exact continuation needs, written atomically.

A checkpoint dir is written as checkpoints/.tmp-step-N, gets a COMPLETE marker last, and is then
renamed to checkpoints/step-N (train/atomic.py). A dir without the marker (a kill during a save)
is never resumed from. Weights are safetensors; optimizer/scheduler/RNG use torch.save and are
read back with weights_only=True, so loading a checkpoint never runs pickled code.

A sharded (FSDP) run writes weights and optimizer state with torch.distributed.checkpoint instead,
under sharded/: each process writes its own shard, nothing is gathered on one process. DCP
reshards on load, so such a checkpoint resumes at any number of processes, sharded or not.
"""
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

from train import lora
from train.atomic import is_complete, write_text
from train.errors import UserError
from train.model_files import SHARDED, is_sharded


@dataclass
class TrainState:
    """The resume state: the data position is derived from `step` (see train/data/loader.py)."""
    step: int = 0  # optimizer steps done
    examples: int = 0  # training pairs seen
    skipped_steps: int = 0  # steps skipped for non-finite values (on_nonfinite=skip)
    last_eval_examples: int = -1  # examples at the last eval, so a resume does not repeat it
    wandb_id: Optional[str] = None  # the same wandb run continues after a resume
    train_seconds: float = 0.0  # wall time in optimizer steps (data loading included), over resumes


def checkpoint_dirs(run_dir: str) -> tuple:
    """(complete checkpoint dirs sorted by step, incomplete dirs) under run_dir/checkpoints."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return [], []
    complete, partial = [], []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        match = re.fullmatch(r"step-(\d+)", name)
        if match and is_complete(path):
            complete.append((int(match.group(1)), path))
        else:
            partial.append(path)
    return [p for _, p in sorted(complete)], sorted(partial)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's device only
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _torch_save(obj, path: str):
    # Through a Python file, so that a failed write (a full disk) surfaces as the OSError that says
    # why; torch.save(obj, path) reports it only as "unexpected pos" (see errors.storage_error).
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_rng(tmp_dir: str, rank: int):
    _torch_save(rng_state(), os.path.join(tmp_dir, f"rng-{rank}.pt"))


def save_sharded(tmp_dir: str, model, optimizer):
    """Every process's part of a sharded checkpoint: its shards of weights and optimizer state.
    Collective: every process calls it."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(tmp_dir, SHARDED))


def load_sharded(path: str, model, optimizer=None, collective: bool = False):
    """Weights (and optimizer state) of a sharded checkpoint into `model`, which may be sharded
    over any number of processes (collective=True: every process calls it) or not at all
    (then each process reads the whole checkpoint on its own)."""
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():  # without a group DCP warns that it reads in one process: that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=os.path.join(path, SHARDED), no_dist=not collective)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def save(tmp_dir: str, model, optimizer, scheduler, state: TrainState, sharded: bool = False):
    """The main process's part of a checkpoint (RNG files, and the shards of a sharded run, are
    written by every process)."""
    if not sharded:
        lora.save_weights(model, os.path.join(tmp_dir, "model.safetensors"))  # all weights; under LoRA adapters + head
        _torch_save(optimizer.state_dict(), os.path.join(tmp_dir, "optimizer.pt"))
    _torch_save(scheduler.state_dict(), os.path.join(tmp_dir, "scheduler.pt"))
    write_text(os.path.join(tmp_dir, "state.json"), json.dumps(asdict(state), indent=1))


def load(path: str, model, optimizer, scheduler, rank: int, sharded: bool = False) -> TrainState:
    """Restore weights, optimizer (with Adam's moments), scheduler and this process's RNG.
    `sharded`: the model is sharded (FSDP), which only a sharded checkpoint can be loaded into."""
    if is_sharded(path):
        load_sharded(path, model, optimizer, collective=sharded)
    elif sharded:
        raise UserError(f"{path} was written by an unsharded (DDP) run: resume it without FSDP, or start afresh")
    else:
        lora.load_weights(model, os.path.join(path, "model.safetensors"))
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu", weights_only=True))
    rng_file = os.path.join(path, f"rng-{rank}.pt")
    if os.path.exists(rng_file):  # resuming on more processes than saved: the new ones start fresh
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    with open(os.path.join(path, "state.json")) as f:
        state = TrainState(**json.load(f))
    # The optimizer must really hold its moments again (a merged dict can silently drop them).
    if state.step > state.skipped_steps and not optimizer.state_dict()["state"]:
        raise RuntimeError(f"optimizer state missing after loading {path}")
    return state


def remove_leftovers(run_dir: str, log=print):
    """Delete what a save killed midway left behind (.tmp-step-N, .tmp-FINAL, FINAL.old-PID,
    *.tmp-PID files), so it does not keep disk space. Only safe under the run-dir lock
    (train/runlock.py): then no other process can be writing them."""
    root = os.path.join(run_dir, "checkpoints")
    names = [os.path.join("checkpoints", n) for n in os.listdir(root)] if os.path.isdir(root) else []
    for name in names + os.listdir(run_dir):
        base = os.path.basename(name)
        if base.startswith(".tmp-") or re.fullmatch(r".+\.(tmp|old)-\d+", base):
            path = os.path.join(run_dir, name)
            log(f"removing {path}: left by a save that did not finish")
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def prune(run_dir: str, keep: int):
    """Delete all but the newest `keep` complete checkpoints; partial dirs are left for inspection."""
    complete, _ = checkpoint_dirs(run_dir)
    for path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
