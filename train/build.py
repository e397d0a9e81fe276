"""Config -> the parts of a run (accelerator, model, tokenizer, data, trainer).

Everything that can be rejected without a model (config values, the run directory, resume) is
checked first, so a mistake costs no model load.
"""
import contextlib
import os
import random

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from train import atomic, checkpoint, lora, sharding, trainers
from train.config import Config, in_multirun, validate
from train.data.loader import load_examples, tokenize
from train.errors import NotStarted, UserError, say, storage_error
from train.models import build_model, prepare_tokenizer
from train.runlock import RunLock


def resolve_run_dir(cfg):
    """Under -m every job writes to its own Hydra job dir (sweep dir / overrides), never a shared one."""
    if in_multirun():
        cfg.local_run_dir = HydraConfig.get().runtime.output_dir
        if cfg.wandb.group is None:
            cfg.wandb.group = os.path.basename(os.path.normpath(HydraConfig.get().sweep.dir))
    return cfg.local_run_dir


def threads_per_job(launcher_cfg, cpus: int = None):
    """torch threads for one job of a sweep whose launcher runs several jobs at once; None: leave as is.

    Each job would otherwise start one thread per core of the machine and the jobs would fight over
    the cores. joblib runs n_jobs at once here; a submitit job asks for cpus_per_task (SLURM gives
    exactly those; submitit_local does not enforce it, so the thread count does).
    """
    target = str(launcher_cfg.get("_target_", ""))
    if "submitit" in target and launcher_cfg.get("cpus_per_task"):
        return int(launcher_cfg.get("cpus_per_task"))
    if "joblib" not in target:
        return None
    cpus = cpus or len(os.sched_getaffinity(0))
    n_jobs = int(launcher_cfg.get("n_jobs") or 1)
    parallel = n_jobs if n_jobs > 0 else max(1, cpus + 1 + n_jobs)  # joblib: -1 = all cores, -2 = all but one
    return max(1, cpus // parallel)


def share_cpu_between_jobs():
    """Jobs of a sweep that share a machine (hydra/launcher=joblib, or submitit with cpus_per_task)
    split its CPU cores instead of each starting one thread per core."""
    threads = threads_per_job(HydraConfig.get().launcher) if in_multirun() else None
    if threads is not None:
        torch.set_num_threads(threads)


def resume_point(cfg, run_dir: str, log=print):
    """None (fresh start), a checkpoint dir, or "finished"; refuses to overwrite earlier work."""
    complete, partial = checkpoint.checkpoint_dirs(run_dir)
    for path in partial:
        log(f"ignoring incomplete checkpoint {path} (no {atomic.MARKER} marker)")
    has_final = atomic.is_complete(os.path.join(run_dir, "FINAL"))
    if cfg.resume is None:
        if has_final:  # resume=auto would only report its result, not train on this config
            raise UserError(f"{run_dir} already holds a finished run (FINAL): choose another exp_name to train "
                            "this config (resume=auto reports the finished run's result without training)")
        if complete:
            raise UserError(f"{run_dir} already holds checkpoints: pass resume=auto to continue it, "
                            "or choose another exp_name")
        return None
    if cfg.resume == "auto":
        if has_final:
            return "finished"
        return complete[-1] if complete else None
    if not os.path.isdir(cfg.resume):
        raise UserError(f"resume={cfg.resume}: no such directory (resume=auto picks the run's newest checkpoint)")
    if not atomic.is_complete(cfg.resume):
        raise UserError(f"resume={cfg.resume}: not a complete checkpoint dir (no {atomic.MARKER} marker)")
    return cfg.resume


# What must not change between a checkpoint and its resume, or the continuation is not exact.
SAME_ON_RESUME = ("seed", "lr", "optimizer", "weight_decay", "warmup", "scheduler", "n_epochs", "n_examples",
                  "batch_size", "max_grad_norm", "loss", "model", "datasets")


def check_resume_config(cfg, run_dir: str, finished: bool = False):
    """The settings an exact continuation needs (SAME_ON_RESUME) are those the run was saved with.
    `finished`: resume=auto on a run with FINAL, which reports that run's result; a changed setting
    there would report a result this config never trained."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    saved, defaults = OmegaConf.load(path), OmegaConf.structured(Config)
    for key in SAME_ON_RESUME:
        old, new, default = (_plain(OmegaConf.select(c, key)) for c in (saved, cfg, defaults))
        if isinstance(old, dict) and isinstance(new, dict) and isinstance(default, dict):
            # A key the harness gained after the run was saved (model.peft, say) is not a change
            # while it keeps its default.
            new = {k: v for k, v in new.items() if k in old or k not in default or v != default[k]}
        if old != new:
            raise UserError(f"{run_dir} finished with '{key}' = {old!r}, now {new!r}: resume=auto would only report "
                            "that run's result; choose another exp_name to train this config" if finished else
                            f"cannot resume {run_dir}: '{key}' was {old!r} in the checkpointed run, now {new!r} "
                            "(an exact continuation needs the same setting)")


def checkpoint_run_dir(path: str) -> str:
    """The run dir a resume=PATH checkpoint belongs to (<run dir>/checkpoints/step-N): its settings,
    not those of the dir this run writes to, are what an exact continuation must keep."""
    checkpoints = os.path.dirname(os.path.abspath(path))
    run_dir = os.path.dirname(checkpoints)
    if os.path.basename(checkpoints) != "checkpoints" or not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise UserError(f"resume={path}: not inside a run dir (<run dir>/checkpoints/step-N with the run's "
                        "config.yaml), so its settings cannot be checked against this config")
    return run_dir


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def fixed_eval_indices(n_test: int, n_eval: int, seed: int = 0) -> list:
    """The same eval pairs at every eval of a run, and for every run on the same data: the eval
    seed is not the training seed, so the jobs of a seed sweep are scored on the same pairs."""
    order = list(range(n_test))
    random.Random(seed).shuffle(order)
    return sorted(order[:n_eval])


def lock_run_dir(run_dir: str, accelerator, held: contextlib.ExitStack):
    """The main process takes the run-dir lock (train/runlock.py) and keeps it in `held` until the
    run ends; every process learns whether it got it, so all stop with the same line if not."""
    refusal = [None]
    if accelerator.is_main_process:
        try:
            os.makedirs(run_dir, exist_ok=True)
            held.enter_context(RunLock(run_dir))
        except UserError as err:
            refusal[0] = str(err)
        except OSError as err:  # a read-only or full cache dir
            refusal[0] = storage_error(f"cannot create the run dir {run_dir}", err)
    broadcast_object_list(refusal)
    if refusal[0]:
        raise UserError(refusal[0])


def build(cfg, held: contextlib.ExitStack = None):
    """The trainer for this config, or None when resume=auto finds the run already finished.

    `held` keeps the run-dir lock until the caller closes it (launch.py: when the run ends)."""
    held = held if held is not None else contextlib.ExitStack()  # else: held until the process exits
    validate(cfg)
    if in_multirun() and trainers.BasicTrainer.stopped_by_signal:  # Ctrl-C stops the sweep, not one job
        raise NotStarted("not started: an earlier job of this sweep was stopped by a signal; rerun with resume=auto")
    share_cpu_between_jobs()
    run_dir = resolve_run_dir(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # else each CPU process is "rank 0 of 1"
    log = say if accelerator.is_main_process else (lambda *a, **k: None)
    trainers.batch_plan(cfg, accelerator.num_processes)
    # On CPU processes accelerate drops DeepSpeed and runs DDP, so its launch variable is checked too.
    kind = "DEEPSPEED" if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" else \
        accelerator.distributed_type.name
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise UserError(f"distributed_type {kind} is not supported by this trainer: "
                        "FSDP2 is the supported way to shard (accelerate_config/fsdp_4gpu.yaml; README, 'Sharded training')")
    if sharding.plugin() and lora.enabled(cfg.model):  # an unsupported FSDP setting stops here too
        raise UserError("model.peft.enabled=true with FSDP is not supported: LoRA trains few parameters, so run it "
                        "with DDP (accelerate_config/ddp_gpu.yaml) and, for a large base, model.dtype=bfloat16")
    if not in_multirun() and os.path.isfile(os.path.join(run_dir, "multirun.yaml")):
        raise UserError(f"{run_dir} holds a sweep (multirun.yaml): choose another exp_name for a single run, "
                        "or rerun the sweep with -m")
    lock_run_dir(run_dir, accelerator, held)  # before the run dir is read: another run may be writing it
    if accelerator.is_main_process:
        checkpoint.remove_leftovers(run_dir, log)
    resume = resume_point(cfg, run_dir, log)
    if resume == "finished":
        check_resume_config(cfg, run_dir, finished=True)
        log(f"{run_dir}/FINAL exists: run already finished, nothing to do")
        return None
    if resume:
        check_resume_config(cfg, run_dir if cfg.resume == "auto" else checkpoint_run_dir(resume))
    if accelerator.is_main_process:
        try:
            atomic.write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))
        except OSError as err:
            raise UserError(storage_error(f"cannot write {run_dir}/config.yaml", err))
    trainer_class = trainers.trainer_class(cfg.loss.trainer)  # checked by validate()
    set_seed(cfg.seed)

    with accelerator.main_process_first():  # a GGUF is converted once; the other processes read it
        tokenizer = prepare_tokenizer(cfg)
    cache = os.path.join(cfg.cache_dir, "tokenized")
    # Every process reads and checks the data, so a bad row stops them all with the same line.
    source_counts = {}
    train_examples, test_examples = load_examples(cfg, log, source_counts)
    if not train_examples or not test_examples:
        raise UserError(f"the data config gives {len(train_examples)} training and {len(test_examples)} held-out pairs: "
                        "both must be at least 1")
    with accelerator.main_process_first():  # tokenise once; the other processes read the cache
        train_ds, train_counts = tokenize(train_examples, tokenizer, cfg.model, cache)
        test_ds, test_counts = tokenize(test_examples, tokenizer, cfg.model, cache)
    counts = {f"{split}_{k}": v for split, c in (("train", train_counts), ("test", test_counts)) for k, v in c.items()}
    counts.update(source_counts)
    log(f"data: {len(train_ds)} train pairs, {len(test_ds)} test pairs; truncated/dropped: {counts}")
    for split, ds in (("training", train_ds), ("held-out", test_ds)):
        if len(ds) == 0:
            raise UserError(f"no {split} pairs fit model.max_length={cfg.model.max_length} with truncation=drop")
    if cfg.n_eval_examples > len(test_ds):
        log(f"n_eval_examples={cfg.n_eval_examples} but only {len(test_ds)} held-out pairs: evaluating on all of them")
    eval_ds = test_ds.select(fixed_eval_indices(len(test_ds), cfg.n_eval_examples))
    model = build_model(cfg, tokenizer, trainer_class.policy_hf_model_class)
    if lora.enabled(cfg.model):
        log(lora.summary(model))
    return trainer_class(cfg, accelerator, model, tokenizer, train_ds, eval_ds, run_dir,
                         resume_from=resume, config_dict=OmegaConf.to_container(cfg, resolve=True),
                         data_counts=counts)
