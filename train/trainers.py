"""BasicTrainer (the loop) -> PairedPreferenceTrainer (pairs) -> the losses.

A loss is one subclass of PairedPreferenceTrainer, anywhere importable, that defines `loss()` and
declares its parameters in a `Params` dataclass, plus one YAML file in config/loss/ that names it
(`trainer:` a short name for the classes here, else a dotted path) and sets its parameters.
README.md, "Add a loss", walks through one.
"""
import abc
import contextlib
import difflib
import inspect
import json
import logging
import math
import os
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import hydra.utils
import torch
from accelerate.utils import gather_object
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from train import atomic, checkpoint, faults, report, sharding
from train.checks import check_type, suggest
from train.data.batching import model_inputs
from train.data.loader import TOKEN_COUNTS, Collator, epoch_order, select
from train.errors import UserError, say, storage_error
from train.losses import bradley_terry_loss, hinge_loss, pair_metrics, smoothed_bradley_terry_loss
from train.models import AutoModelForBradleyTerry
from train.tracking import Tracker

# The per-pair entries of a batch (train/data/loader.py, Collator) a loss may ask for in
# `pair_fields`: margin is a float tensor (0 where a pair has none), subset and index are lists.
PAIR_FIELDS = ("margin", "subset", "index")


class NonFiniteError(UserError):
    """A NaN or inf loss or gradient with on_nonfinite=stop."""


def batch_plan(cfg, world: int) -> tuple:
    """(pairs per process per step, accumulation steps); checked before any model loads."""
    per_process, rest = divmod(cfg.batch_size, world)
    micro = min(cfg.microbatch_size, per_process)  # a small batch_size alone needs no microbatch_size
    accumulation = per_process // micro if micro else 0
    if rest or accumulation == 0 or per_process % micro:
        raise UserError(f"batch_size ({cfg.batch_size}) must be microbatch_size ({cfg.microbatch_size}) "
                        f"x processes ({world}) x a whole number of accumulation steps")
    return per_process, accumulation


def _param_groups(model, weight_decay: float) -> list:
    """No weight decay on biases and norm weights (1-D tensors), as is standard for transformers."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def unknown_loss_key(key: str, trainer: type, where: str = "") -> UserError:
    params = [f.name for f in fields(trainer.Params)]
    return UserError(f"unknown config key 'loss.{key}'{suggest(key, params)}; {trainer.__name__}{where} takes "
                     f"{', '.join(params) or 'no parameters'}")


def loss_params(trainer: type, loss) -> Any:
    """The loss's parameters as the trainer's typed Params: cfg.loss minus `trainer`, merged into
    the Params dataclass, whose __post_init__ checks the values. One line for an unknown key, a
    wrong type, a missing value or a value out of range."""
    options = OmegaConf.to_container(loss, resolve=True) if OmegaConf.is_config(loss) else dict(loss or {})
    options.pop("trainer", None)
    params = {f.name: f for f in fields(trainer.Params)}
    for key, value in options.items():
        if key not in params:
            raise unknown_loss_key(key, trainer)
        check_type(f"loss.{key}", params[key].type, value)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(trainer.Params), options))
    except MissingMandatoryValue as err:
        raise UserError(f"config key 'loss.{err.full_key}' is required but not set")
    except ValidationError as err:
        raise UserError(f"config key 'loss.{err.full_key}': {str(err).splitlines()[0]}")
    except ValueError as err:  # a range check in Params.__post_init__
        raise UserError(f"loss.{str(err).splitlines()[0]}")


def trainer_class(name: str) -> type:
    """The trainer that `loss.trainer` names: a class of this module by its short name
    (BradleyTerryTrainer), or any importable class by its dotted path (my_pkg.losses.HingeTrainer),
    loaded with Hydra's get_class. One line (UserError) if it cannot be loaded, is not a
    BasicTrainer, or is abstract; checked by config.validate() before any model loads."""
    path = name if "." in name else f"{__name__}.{name}"
    hydra_log = logging.getLogger("hydra.utils")
    was_disabled, hydra_log.disabled = hydra_log.disabled, True  # get_class logs a failure in several lines
    try:
        cls = hydra.utils.get_class(path)
    except (ImportError, ValueError) as err:
        cause = err.__cause__
        if cause is not None and not isinstance(cause, (ImportError, AttributeError)):
            raise cause  # the module was found but fails to import: a bug there, keep its traceback
        if "." not in name:
            raise UserError(f"loss.trainer '{name}': no class {path}{_suggest_trainer(name)}; name a trainer "
                            "elsewhere by its dotted path, e.g. my_pkg.losses.MyTrainer")
        why = str(cause or err).splitlines()[0]
        raise UserError(f"loss.trainer '{name}': cannot load it with hydra.utils.get_class ({why})")
    finally:
        hydra_log.disabled = was_disabled
    if not issubclass(cls, BasicTrainer):
        raise UserError(f"loss.trainer '{name}' is not a trainer: {path} is not a subclass of {__name__}.BasicTrainer")
    if inspect.isabstract(cls):
        missing = ", ".join(f"{m}()" for m in sorted(cls.__abstractmethods__))
        raise UserError(f"loss.trainer '{name}' is abstract: it defines no {missing}")
    if not is_dataclass(cls.Params):
        raise UserError(f"loss.trainer '{name}': its Params must be a dataclass")
    unknown = [f for f in cls.pair_fields if f not in PAIR_FIELDS]
    if unknown:
        raise UserError(f"loss.trainer '{name}' asks for pair field '{unknown[0]}', which batches do not have "
                        f"(they have {', '.join(PAIR_FIELDS)})")
    return cls


def _suggest_trainer(name: str) -> str:
    known = [n for n, c in globals().items() if isinstance(c, type) and issubclass(c, BasicTrainer)
             and not inspect.isabstract(c)]
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _join(values: list):
    """Per-pair values back into one batch entry: a tensor if they were tensor elements, else a list."""
    return torch.stack(values) if values and torch.is_tensor(values[0]) else list(values)


class BasicTrainer(abc.ABC):
    """The accelerate loop: microbatches, accumulation, clipping, steps, eval, checkpoints, logs."""

    @dataclass
    class Params:
        """A loss's parameters, set in its config/loss/<name>.yaml and given to the trainer as
        `self.params`. A subclass declares its own: fields with defaults (and their unit in a
        comment), and a __post_init__ that raises ValueError for a value out of range."""

    pair_fields = ("margin",)  # the batch entries (PAIR_FIELDS) loss() receives by name, in training and eval
    policy_hf_model_class = None  # the model class build.py loads for this trainer
    stopped_by_signal = False  # class-wide: once a sweep is signalled, its later jobs do not start

    def __init__(self, cfg, accelerator, model, tokenizer, train_ds, eval_ds, run_dir: str,
                 resume_from=None, config_dict=None, data_counts=None):
        self.cfg, self.accelerator, self.tokenizer = cfg, accelerator, tokenizer
        self.train_ds, self.eval_ds, self.run_dir = train_ds, eval_ds, run_dir
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.data_counts = data_counts or {}
        self.params = loss_params(type(self), cfg.loss)
        self.per_process, self.accumulation = batch_plan(cfg, self.world)
        self.steps_per_epoch = len(train_ds) // cfg.batch_size  # an incomplete last batch is dropped
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(train_ds)} training pairs make no full batch of batch_size={cfg.batch_size}")
        self.total_steps = cfg.n_epochs * self.steps_per_epoch
        if cfg.n_examples is not None:  # a cap on pairs, rounded down to whole optimizer steps
            self.total_steps = min(self.total_steps, cfg.n_examples // cfg.batch_size)
        packing = self._packing(model)
        # FSDP (train/sharding.py) shards the model before the optimizer sees its parameters.
        self.fsdp = sharding.plugin()
        if self.fsdp:
            sharding.shard(model, self.fsdp, accelerator)
        self.parallelism = "fsdp" if self.fsdp else "ddp"
        optimizer_class = getattr(torch.optim, cfg.optimizer)  # checked by config.validate()
        # The fused kernel where the optimizer has one (AdamW, Adam, SGD...): on 2 CPU cores an
        # AdamW step over SmolLM2's 135M parameters took 0.11 s fused against 0.47 s by default.
        fused = {"fused": True} if "fused" in inspect.signature(optimizer_class).parameters else {}
        optimizer = optimizer_class(_param_groups(model, cfg.weight_decay), lr=cfg.lr, **fused)
        # Not passed to accelerator.prepare: its wrapper steps once per process per step.
        self.scheduler = get_scheduler(cfg.scheduler, optimizer,
                                       num_warmup_steps=math.ceil(cfg.warmup * self.total_steps),
                                       num_training_steps=self.total_steps)
        lambdas = getattr(self.scheduler, "lr_lambdas", None)  # get_scheduler's schedules are LambdaLRs
        if lambdas and not any(f(s) for f in lambdas for s in range(self.total_steps)):
            # A linear warmup starts at 0: a run of 1 step (n_examples = batch_size) would change nothing.
            self._say(f"warning: the learning rate is 0 at every one of the {self.total_steps} optimizer step(s) "
                      f"(warmup={cfg.warmup}, scheduler={cfg.scheduler}), so the weights will not change: train more "
                      "steps or set warmup=0")
        if cfg.compile:  # in place: the state dict keeps its names, so checkpoints are unchanged
            model.hf_model.base_model.compile(dynamic=True)
        # A sharded model is never handed to accelerate, which would wrap it in DDP on CPU processes.
        self.model, self.optimizer = (model, optimizer) if self.fsdp else accelerator.prepare(model, optimizer)
        self.collate = Collator(tokenizer.pad_token_id, packing, cfg.share_prompt)
        self.lengths = None  # for length grouping: a pair's chosen + rejected tokens
        if cfg.length_grouping:
            self.lengths = [len(c) + len(r) for c, r in zip(train_ds["chosen_ids"], train_ds["rejected_ids"])]
        self.state = checkpoint.TrainState()
        if resume_from:
            self._resume(resume_from)
        self.tracker = Tracker(run_dir, cfg, enabled=accelerator.is_main_process,
                               wandb_id=self.state.wandb_id, config_dict=config_dict)
        self.state.wandb_id = self.tracker.wandb_id or self.state.wandb_id
        # Records written after the checkpoint (or by a run killed before its first one) go.
        self.tracker.truncate_after(self.state.examples if resume_from else -1)
        self.stop_requested = False
        self.n_evals = self.n_saves = 0  # in this process's life, for faults.reached

    # ---- what subclasses define -------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, batch: dict, model=None) -> tuple:
        """(chosen scores, rejected scores) of a collated batch, each of shape (pairs,)."""

    @abc.abstractmethod
    def loss(self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, **pair_fields) -> torch.Tensor:
        """The mean loss over the pairs. margin is a float tensor (0 where a pair has none); a loss
        that needs other per-pair entries names them in `pair_fields` and receives them by name."""

    def pair_inputs(self, batch: dict, device=None) -> dict:
        """The entries of a batch that loss() asks for (pair_fields), tensors moved to `device`."""
        values = {name: batch[name] for name in self.pair_fields}
        return {k: v.to(device) if device is not None and torch.is_tensor(v) else v for k, v in values.items()}

    # ---- data position -------------------------------------------------------------------------
    def microbatches(self, step: int) -> list:
        """This process's microbatches (lists of row indices) of global optimizer step `step`."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        start = in_epoch * self.cfg.batch_size + self.rank * self.per_process
        mine = order[start:start + self.per_process]
        m = self.cfg.microbatch_size
        return [mine[i:i + m] for i in range(0, len(mine), m)]

    def _order(self, epoch: int) -> list:
        if getattr(self, "_order_epoch", None) != epoch:
            order = epoch_order(len(self.train_ds), self.cfg.seed, epoch, self.lengths, self.cfg.batch_size)
            self._order_cache, self._order_epoch = order, epoch
        return self._order_cache

    def _packing(self, model):
        """The Collator's packing spec, or None (padded batches) when packing is off or the model
        cannot take packed batches; the latter is said once, since it costs speed, not correctness."""
        if not self.cfg.packing:
            return None
        spec = model.enable_packing() if hasattr(model, "enable_packing") else None
        if spec is None:
            inner = getattr(model, "hf_model", model)
            attn = getattr(getattr(inner, "config", None), "_attn_implementation", None)
            self._say(f"packing=true: {type(inner).__name__}" + (f" with {attn} attention" if attn else "") +
                      " cannot take packed batches (train/attention.py); padding its batches instead")
        return spec

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> str:
        """Train to the end (returns "done") or to a preemption checkpoint (returns "preempted")."""
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step",
                   disable=not self.accelerator.is_main_process, dynamic_ncols=True)
        try:
            return self._train(bar)
        finally:
            bar.close()  # so an error message starts on a line of its own
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _train(self, bar) -> str:
        cfg, state = self.cfg, self.state
        faults.set_phase("step")
        if state.step == 0 and cfg.do_first_eval and state.last_eval_examples < 0:
            self.evaluate()
        self.model.train()
        batches = iter(self.train_loader())
        while state.step < self.total_steps:
            record, stop = self.train_step(batches)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
            if self._crossed(cfg.eval_every) and state.step < self.total_steps:
                self.evaluate()  # the final eval below covers the last step
            if stop:
                self.save_checkpoint()
                bar.close()  # the last line the user sees, below the bar rather than redrawn over
                self._say(f"stopped by a signal after step {state.step}; continue with the same command "
                          f"plus resume=auto (run dir {self.run_dir})")
                return "preempted"
            if cfg.save_every and self._crossed(cfg.save_every) and state.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        self.save_final(self.evaluate(final=True))
        return "done"

    def train_loader(self) -> DataLoader:
        """This process's microbatches from the current step to the end, in order."""
        plan = [mb for step in range(self.state.step, self.total_steps) for mb in self.microbatches(step)]
        # Its own generator: iter() would otherwise draw from the global torch RNG, which a resume
        # has just restored, and shift every dropout mask after it.
        return DataLoader(self.train_ds, batch_sampler=plan, collate_fn=self.collate,
                          num_workers=self.cfg.num_workers, generator=torch.Generator())

    def train_step(self, batches) -> tuple:
        """One optimizer step over this process's next `accumulation` microbatches: accumulate,
        reduce, optimizer_step. Returns the step's train record and whether any process was asked
        to stop (a signal)."""
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        local = self.accumulate([next(batches) for _ in range(self.accumulation)])
        if self.fsdp:  # torch's clipping works on sharded gradients; the norm comes back as a DTensor
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        else:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        grad_norm = float(sharding.full(norm))
        total = self.reduce({**local, "nonfinite": float(not math.isfinite(local["loss"])),
                             "stop": float(self.stop_requested)})
        self.optimizer_step(finite=total["nonfinite"] == 0 and math.isfinite(grad_norm))
        state = self.state
        seconds = time.perf_counter() - start
        state.train_seconds += seconds
        n = total["n"]
        counts = {k: int(total[k]) for k in TOKEN_COUNTS}
        record = {"split": "train", "step": state.step, "examples": state.examples,
                  "loss": total["loss"] / n, "accuracy": total["correct"] / n, "margin": total["margin"] / n,
                  "chosen": total["chosen"] / n, "rejected": total["rejected"] / n, "grad_norm": grad_norm,
                  "lr": lr, "pairs_per_s": n / seconds, "tokens_per_s": total["tokens"] / seconds,
                  "skipped_steps": state.skipped_steps, "train_seconds": state.train_seconds,
                  "world_size": self.world, "parallelism": self.parallelism,
                  "mixed_precision": self.accelerator.mixed_precision, **counts}
        self.tracker.log(record)
        faults.reached("after_step", state.step, self.model)
        return record, total["stop"] > 0

    def accumulate(self, micro: list) -> dict:
        """Forward and backward over the microbatches of one step, adding up their gradients.
        Each loss is divided by their number: the microbatches have the same size, so the sum is
        the mean over the step's pairs. Returns this process's sums for the logs."""
        acc = self.accelerator
        sums = dict.fromkeys(("n", "correct", "margin", "chosen", "rejected", "loss", *TOKEN_COUNTS), 0)
        for i, batch in enumerate(micro):
            # Gradients are all-reduced between processes only on the last microbatch of a step.
            last = i == len(micro) - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            with contextlib.nullcontext() if last or self.fsdp else acc.no_sync(self.model):
                chosen, rejected = self.forward(batch)
                loss = self.loss(chosen, rejected, **self.pair_inputs(batch, chosen.device))
                acc.backward(loss / len(micro))
            faults.reached("mid_step", self.state.step + 1)
            for key, value in pair_metrics(chosen, rejected).items():
                sums[key] += value
            sums["loss"] += loss.item() * len(batch["index"])
            for key in TOKEN_COUNTS:
                sums[key] += batch[key]
        return sums

    def reduce(self, values: dict) -> dict:
        """Named numbers summed over all processes in ONE all-reduce, read back by name. The logs,
        the non-finite check and a stop request all go through it, so every process takes the
        same decision at the same step."""
        local = torch.tensor(list(values.values()), dtype=torch.float64, device=self.accelerator.device)
        return dict(zip(values, self.accelerator.reduce(local, reduction="sum").tolist()))

    def optimizer_step(self, finite: bool):
        """Applies the accumulated gradients, or skips a non-finite step (on_nonfinite=skip) or
        stops at it (stop); then advances the schedule and the data position."""
        acc, state = self.accelerator, self.state
        if acc.scaler is not None:  # fp16 loss scaling: overflow steps are normal, the scaler skips them
            self.optimizer.step()
            state.skipped_steps += int(acc.optimizer_step_was_skipped)
        elif finite:
            self.optimizer.step()
        elif self.cfg.on_nonfinite == "skip":
            state.skipped_steps += 1
        else:
            last = checkpoint.checkpoint_dirs(self.run_dir)[0]
            raise NonFiniteError(f"non-finite loss or gradient at step {state.step + 1}; last good checkpoint: "
                                 f"{last[-1] if last else 'none'} (on_nonfinite=skip skips such steps)")
        # A skipped step advances the schedule too (it counts steps); torch would warn each time
        # that the optimizer had not stepped first.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.examples += self.cfg.batch_size

    def _crossed(self, every: int) -> bool:
        examples = self.state.examples
        return examples // every > (examples - self.cfg.batch_size) // every

    def _request_stop(self, signum, frame):
        self.stop_requested = True  # acted on at the next step boundary
        BasicTrainer.stopped_by_signal = True

    def _say(self, message: str):
        if self.accelerator.is_main_process:
            say(message)

    # ---- eval ----------------------------------------------------------------------------------
    def evaluate(self, final: bool = False) -> dict:
        """Scores the FIXED eval set, split over processes; the main process logs and returns metrics."""
        with faults.phase("eval"):
            record = self._evaluate(final)
        if not final:  # the final eval has its own line (launch.py)
            self._say(f"eval at step {record['step']}: accuracy {record['accuracy']:.3f}, loss {record['loss']:.3f} "
                      f"({record['n_pairs']} held-out pairs)")
        return record

    @torch.no_grad()  # not inference_mode: FSDP would keep inference tensors as buffers that training reuses
    def _evaluate(self, final: bool) -> dict:
        model = self.accelerator.unwrap_model(self.model)  # no DDP: shards may differ in length
        model.eval()
        mine = list(range(self.rank, len(self.eval_ds), self.world))
        rows = select(self.eval_ds, mine)
        rows.sort(key=lambda r: -len(r["chosen_ids"]) - len(r["rejected_ids"]))  # minimal padding
        pairs = []  # one dict per pair: its index, subset, source, lengths, scores and what loss() asks for
        size = self.cfg.eval_batch_size
        # Its own bar: an eval of hundreds of pairs would otherwise freeze the train bar for a minute.
        for i in tqdm(range(0, len(rows), size), desc="eval", unit="batch", leave=False, dynamic_ncols=True,
                      disable=not self.accelerator.is_main_process):
            batch = self.collate(rows[i:i + size])
            chosen, rejected = self.forward(batch, model=model)
            inputs = self.pair_inputs(batch)
            lengths = [report.response_lengths(row["chosen_ids"], row["rejected_ids"]) for row in rows[i:i + size]]
            sources = batch.get("source") or [""] * len(lengths)
            pairs += [{"index": index, "subset": subset, "source": source, "chosen": c, "rejected": r,
                       "chosen_len": length[0], "rejected_len": length[1],
                       **{name: value[j] for name, value in inputs.items()}}
                      for j, (index, subset, source, length, c, r) in enumerate(zip(
                          batch["index"], batch["subset"], sources, lengths, chosen.float().tolist(),
                          rejected.float().tolist()))]
            faults.reached("eval", self.n_evals + 1)
        if self.fsdp:  # each forward gathers every layer from all processes, so all make as many
            most = math.ceil(math.ceil(len(self.eval_ds) / self.world) / size)
            for _ in range(most - math.ceil(len(rows) / size)):
                self.forward(self.collate(select(self.eval_ds, [0])), model=model)
        self.n_evals += 1
        model.train()
        everything = sorted(gather_object(pairs), key=lambda p: p["index"])
        self.state.last_eval_examples = self.state.examples
        record = self.eval_metrics(everything)
        record = {"split": "eval", "step": self.state.step, "examples": self.state.examples, **record,
                  "world_size": self.world, "parallelism": self.parallelism}
        self.tracker.log(record)
        self.last_eval = record
        if final:  # save_final writes FINAL/eval_report.json and its PNGs from them (train/report.py)
            self.final_eval_pairs = everything
        if final and self.cfg.write_predictions and self.accelerator.is_main_process:
            lines = "".join(json.dumps({"chosen": p["chosen"], "rejected": p["rejected"]}) + "\n" for p in everything)
            atomic.write_text(os.path.join(self.run_dir, "generated_predictions.jsonl"), lines)
        return record

    def eval_metrics(self, pairs: list) -> dict:
        """Metrics over every eval pair; the loss is loss() on all of them at once, called as in training."""
        chosen = torch.tensor([p["chosen"] for p in pairs])
        rejected = torch.tensor([p["rejected"] for p in pairs])
        loss = self.loss(chosen, rejected, **{name: _join([p[name] for p in pairs]) for name in self.pair_fields})
        sums = pair_metrics(chosen, rejected)
        n = sums["n"]
        rewards = torch.cat([chosen, rejected])
        record = {"loss": loss.item(), "accuracy": sums["correct"] / n, "margin": sums["margin"] / n,
                  "chosen": sums["chosen"] / n, "rejected": sums["rejected"] / n,
                  "reward_min": rewards.min().item(), "reward_mean": rewards.mean().item(),
                  "reward_max": rewards.max().item(), "n_pairs": n}
        for subset in sorted({p["subset"] for p in pairs}):
            keep = torch.tensor([p["subset"] == subset for p in pairs])
            record[f"accuracy/{subset}"] = (chosen[keep] > rejected[keep]).float().mean().item()
        sources = sorted({p.get("source", "") for p in pairs})
        for source in sources if len(sources) > 1 else []:  # one source: its accuracy is `accuracy`
            keep = torch.tensor([p.get("source", "") == source for p in pairs])
            record.setdefault(f"accuracy/source={source}", (chosen[keep] > rejected[keep]).float().mean().item())
        return record

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self):
        """checkpoints/step-N, written as .tmp-step-N and renamed once complete (train/checkpoint.py)."""
        acc = self.accelerator
        root = os.path.join(self.run_dir, "checkpoints")
        final_dir = os.path.join(root, f"step-{self.state.step}")
        tmp = os.path.join(root, f".tmp-step-{self.state.step}")

        def start():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)

        def everyone():  # every process's RNG, and under FSDP its shards
            checkpoint.save_rng(tmp, self.rank)
            if self.fsdp:
                checkpoint.save_sharded(tmp, self.model, self.optimizer)

        def finish():
            checkpoint.save(tmp, acc.unwrap_model(self.model), self.optimizer, self.scheduler, self.state,
                            sharded=bool(self.fsdp))
            self.n_saves += 1
            faults.reached("save", self.n_saves)  # files written, marker not yet: a torn checkpoint
            atomic.publish_dir(tmp, final_dir)
            checkpoint.prune(self.run_dir, self.cfg.keep_last_n_checkpoints)

        with faults.phase("save"):
            what = f"checkpoint {final_dir}"
            self._save_part(what, tmp, start if acc.is_main_process else None)
            self._save_part(what, tmp, everyone)
            self._save_part(what, tmp, finish if acc.is_main_process else None)  # the marker after everyone's files

    def _save_part(self, what: str, tmp: str, work):
        """Runs this process's part of a save, then waits for the others. If a write failed on any
        process (a full disk, a read-only dir), the temporary dir is removed, so it neither keeps
        the space nor looks like a checkpoint, and every process stops with the same line.
        Nothing else is touched: the previous checkpoint stays complete and resumable."""
        error = None
        try:
            if work is not None:
                work()
        except (OSError, RuntimeError, SafetensorError, CheckpointException) as err:  # torch.save: ENOSPC as RuntimeError
            error = storage_error(f"could not save {what}", err)
        errors = [e for e in gather_object([error]) if e]
        if errors:
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            complete = checkpoint.checkpoint_dirs(self.run_dir)[0]
            kept = f"the last complete checkpoint is {complete[-1]}" if complete else "there is no complete checkpoint"
            raise UserError(f"{errors[0]}; {kept}. Free some space (or make the dir writable), then rerun "
                            "with resume=auto")

    def _resume(self, path: str):
        model = self.accelerator.unwrap_model(self.model)
        self.state = checkpoint.load(path, model, self.optimizer, self.scheduler, self.rank, sharded=bool(self.fsdp))
        self._say(f"resumed from {path} at step {self.state.step} ({self.state.examples} pairs seen)")

    def save_final(self, final_metrics: dict):
        """FINAL/: save_pretrained weights + tokenizer + metrics.json + the final eval's report
        (eval_report.json, reliability.png, reward_hist.png: train/report.py), written under a temp name."""
        acc = self.accelerator
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.model)
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(sharding.local(p)).all()]
        if self.fsdp:  # each process holds a shard: all must learn of a bad one, so all stop together
            bad = [name for names in gather_object([bad]) for name in names]
        if bad:
            raise NonFiniteError(f"non-finite weights ({bad[0]}...): FINAL not written")
        weights = sharding.full_state_dict(model) if self.fsdp else None  # gathered on the main process
        tmp = os.path.join(self.run_dir, ".tmp-FINAL")

        def write():
            shutil.rmtree(tmp, ignore_errors=True)
            self.tracker.plot()
            model.save_pretrained(tmp, **({"state_dict": weights} if self.fsdp else {}))
            self.tokenizer.save_pretrained(tmp)
            metrics = {**final_metrics, "steps": self.state.step, "train_examples": self.state.examples,
                       "skipped_steps": self.state.skipped_steps, "world_size": self.world,
                       "parallelism": self.parallelism, "mixed_precision": self.accelerator.mixed_precision,
                       **{f"data_{k}": v for k, v in self.data_counts.items()}}
            atomic.write_text(os.path.join(tmp, "metrics.json"), json.dumps(metrics, indent=1))
            pairs = getattr(self, "final_eval_pairs", None)
            if pairs:  # the report python -m train.evaluate writes, on the final eval's pairs
                about = {"model": "FINAL", "pairs": f"the fixed eval subset ({len(pairs)} held-out pairs)",
                         "step": self.state.step, "world_size": self.world}
                report.write_report(os.path.join(tmp, f"{report.REPORT_NAME}.json"),
                                    {**about, **report.preference_report(pairs)}, pairs)
            atomic.publish_dir(tmp, os.path.join(self.run_dir, "FINAL"))

        with faults.phase("save", after="done"):
            self._save_part(f"{self.run_dir}/FINAL", tmp, write if acc.is_main_process else None)
        self._say(f"final eval accuracy {final_metrics['accuracy']:.3f} on {final_metrics['n_pairs']} held-out pairs; "
                  f"saved {self.run_dir}/FINAL")

    def cleanup(self, failed: bool = False):
        self.tracker.finish(exit_code=1 if failed else 0)


class PairedPreferenceTrainer(BasicTrainer):
    """Chosen and rejected go through the model in ONE forward: half the kernel launches.
    Abstract: a loss subclasses it and defines loss()."""

    policy_hf_model_class = AutoModelForBradleyTerry  # reward = logits[:, 1]

    def forward(self, batch: dict, model=None):
        model = model if model is not None else self.model
        device = self.accelerator.device
        scores = model(**model_inputs(batch, device))
        n = len(batch["index"])
        return scores[:n], scores[n:]


class BradleyTerryTrainer(PairedPreferenceTrainer):
    """-log sigmoid(s_c - s_r - margin) + centering; no reference model."""

    @dataclass
    class Params:
        center_rewards_coefficient: float = 0.0  # weight of mean((s_c + s_r)^2), per squared reward unit; 0.01 is usual

        def __post_init__(self):
            if not 0 <= self.center_rewards_coefficient < math.inf:
                raise ValueError(f"center_rewards_coefficient must be at least 0 (and finite), "
                                 f"got {self.center_rewards_coefficient}")

    def loss(self, chosen, rejected, margin):
        return bradley_terry_loss(chosen, rejected, margin, self.params.center_rewards_coefficient)


class BradleyTerrySmoothTrainer(BradleyTerryTrainer):
    """Bradley-Terry with label smoothing, for noisy labels: -(1-eps) log sigmoid(d) - eps log sigmoid(-d)."""

    @dataclass
    class Params(BradleyTerryTrainer.Params):
        label_smoothing: float = 0.1  # share of labels assumed flipped, in [0, 0.5); 0.1 suits human labels

        def __post_init__(self):
            super().__post_init__()
            if not 0 <= self.label_smoothing < 0.5:
                raise ValueError(f"label_smoothing must be at least 0 and less than 0.5, got {self.label_smoothing}")

    def loss(self, chosen, rejected, margin):
        p = self.params
        return smoothed_bradley_terry_loss(chosen, rejected, margin, p.label_smoothing, p.center_rewards_coefficient)


class HingeTrainer(PairedPreferenceTrainer):
    """Margin ranking: max(0, hinge_margin - (s_c - s_r - margin)); pairs already apart by hinge_margin add nothing."""

    @dataclass
    class Params:
        hinge_margin: float = 1.0  # in reward units: how far chosen must beat rejected; 1.0 is usual

        def __post_init__(self):
            if not 0 <= self.hinge_margin < math.inf:
                raise ValueError(f"hinge_margin must be at least 0 (and finite), got {self.hinge_margin}")

    def loss(self, chosen, rejected, margin):
        return hinge_loss(chosen, rejected, margin, self.params.hinge_margin)
