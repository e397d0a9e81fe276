"""BasicTrainer (the loop) -> PairedPreferenceTrainer (pairs) -> BradleyTerryTrainer (the loss).

A new loss is one subclass of PairedPreferenceTrainer that sets `loss()`, plus one YAML file in
config/loss/ that names it.
"""
import contextlib
import json
import math
import os
import shutil
import signal
import time

import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from train import checkpoint, faults
from train.data.loader import Collator, epoch_order, select
from train.errors import UserError, storage_error
from train.losses import bradley_terry_loss, pair_metrics
from train.models import AutoModelForBradleyTerry
from train.tracking import Tracker


class NonFiniteError(UserError):
    """A NaN or inf loss or gradient with on_nonfinite=stop."""


def batch_plan(cfg, world: int) -> tuple:
    """(pairs per process per step, accumulation steps); checked before any model loads."""
    per_process, rest = divmod(cfg.batch_size, world)
    accumulation = per_process // cfg.microbatch_size
    if rest or per_process % cfg.microbatch_size or accumulation == 0:
        raise UserError(f"batch_size ({cfg.batch_size}) must be microbatch_size ({cfg.microbatch_size}) "
                        f"x processes ({world}) x a whole number of accumulation steps")
    return per_process, accumulation


def _param_groups(model, weight_decay: float) -> list:
    """No weight decay on biases and norm weights (1-D tensors), as is standard for transformers."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class BasicTrainer:
    """The accelerate loop: microbatches, accumulation, clipping, steps, eval, checkpoints, logs."""

    policy_hf_model_class = None
    use_reference_model = False
    stopped_by_signal = False  # class-wide: once a sweep is signalled, its later jobs do not start

    def __init__(self, cfg, accelerator, model, tokenizer, train_ds, eval_ds, run_dir: str,
                 resume_from=None, config_dict=None, data_counts=None):
        self.cfg, self.accelerator, self.tokenizer = cfg, accelerator, tokenizer
        self.train_ds, self.eval_ds, self.run_dir = train_ds, eval_ds, run_dir
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.data_counts = data_counts or {}
        self.per_process, self.accumulation = batch_plan(cfg, self.world)
        self.steps_per_epoch = len(train_ds) // cfg.batch_size  # an incomplete last batch is dropped
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(train_ds)} training pairs make no full batch of batch_size={cfg.batch_size}")
        self.total_steps = cfg.n_epochs * self.steps_per_epoch
        if cfg.n_examples is not None:  # a cap on pairs, rounded down to whole optimizer steps
            self.total_steps = min(self.total_steps, cfg.n_examples // cfg.batch_size)
        optimizer_class = getattr(torch.optim, cfg.optimizer)  # checked by config.validate()
        optimizer = optimizer_class(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
        # Not passed to accelerator.prepare: its wrapper steps once per process per step.
        self.scheduler = get_scheduler(cfg.scheduler, optimizer,
                                       num_warmup_steps=math.ceil(cfg.warmup * self.total_steps),
                                       num_training_steps=self.total_steps)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.collate = Collator(tokenizer.pad_token_id)
        self.state = checkpoint.TrainState()
        if resume_from:
            self._resume(resume_from)
        self.tracker = Tracker(run_dir, cfg, enabled=accelerator.is_main_process,
                               wandb_id=self.state.wandb_id, config_dict=config_dict)
        self.state.wandb_id = self.tracker.wandb_id or self.state.wandb_id
        # Records written after the checkpoint (or by a run killed before its first one) go.
        self.tracker.truncate_after(self.state.examples if resume_from else -1)
        self.stop_requested = False
        self.n_evals = self.n_saves = 0  # in this process's life, for faults.kill_point

    # ---- what subclasses define -------------------------------------------------------------
    def forward(self, batch: dict):
        raise NotImplementedError

    def loss(self, chosen, rejected, batch: dict) -> torch.Tensor:
        raise NotImplementedError

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
            self._order_cache, self._order_epoch = epoch_order(len(self.train_ds), self.cfg.seed, epoch), epoch
        return self._order_cache

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
            record = self.train_step(batches)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
            if self._crossed(cfg.eval_every) and state.step < self.total_steps:
                self.evaluate()  # the final eval below covers the last step
            if record.pop("_stop"):
                self.save_checkpoint()
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

    def train_step(self, batches) -> dict:
        """One optimizer step over the next `accumulation` microbatches of this process."""
        cfg, acc, state = self.cfg, self.accelerator, self.state
        start = time.perf_counter()
        micro = [next(batches) for _ in range(self.accumulation)]
        lr = self.scheduler.get_last_lr()[0]
        sums = {"n": 0, "correct": 0, "margin": 0.0, "chosen": 0.0, "rejected": 0.0, "loss": 0.0, "tokens": 0}
        for i, batch in enumerate(micro):
            # Gradients are all-reduced only on the last microbatch of a step.
            sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(self.model)
            with sync:
                chosen, rejected = self.forward(batch)
                loss = self.loss(chosen, rejected, batch)
                acc.backward(loss / len(micro))  # every microbatch has the same size: mean of means
            faults.kill_point("mid_step", state.step + 1)
            for key, value in pair_metrics(chosen, rejected).items():
                sums[key] += value
            sums["loss"] += loss.item() * len(batch["index"])
            sums["tokens"] += int(batch["attention_mask"].sum())
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        # One all-reduce per step for logs, the non-finite check and a stop request, so every
        # process takes the same decision at the same step.
        local = torch.tensor([sums["n"], sums["correct"], sums["margin"], sums["chosen"], sums["rejected"],
                              sums["loss"], sums["tokens"], float(not math.isfinite(sums["loss"])),
                              float(self.stop_requested)], dtype=torch.float64, device=acc.device)
        total = acc.reduce(local, reduction="sum").tolist()
        n = total[0]
        finite = total[7] == 0 and math.isfinite(float(grad_norm))
        if acc.scaler is not None:  # fp16 loss scaling: overflow steps are normal, the scaler skips them
            self.optimizer.step()
            state.skipped_steps += int(acc.optimizer_step_was_skipped)
        elif finite:
            self.optimizer.step()
        elif cfg.on_nonfinite == "skip":
            state.skipped_steps += 1
        else:
            last = checkpoint.checkpoint_dirs(self.run_dir)[0]
            raise NonFiniteError(f"non-finite loss or gradient at step {state.step + 1}; last good checkpoint: "
                                 f"{last[-1] if last else 'none'} (on_nonfinite=skip skips such steps)")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.examples += cfg.batch_size
        seconds = time.perf_counter() - start
        state.train_seconds += seconds
        record = {"split": "train", "step": state.step, "examples": state.examples,
                  "loss": total[5] / n, "accuracy": total[1] / n, "margin": total[2] / n,
                  "chosen": total[3] / n, "rejected": total[4] / n, "grad_norm": float(grad_norm),
                  "lr": lr, "pairs_per_s": n / seconds, "tokens_per_s": total[6] / seconds,
                  "skipped_steps": state.skipped_steps, "train_seconds": state.train_seconds,
                  "world_size": self.world}
        self.tracker.log(record)
        faults.inf_weights(state.step, self.model)
        faults.kill_point("after_step", state.step)
        return {**record, "_stop": total[8] > 0}

    def _crossed(self, every: int) -> bool:
        examples = self.state.examples
        return examples // every > (examples - self.cfg.batch_size) // every

    def _request_stop(self, signum, frame):
        self.stop_requested = True  # acted on at the next step boundary
        BasicTrainer.stopped_by_signal = True

    def _say(self, message: str):
        if self.accelerator.is_main_process:
            tqdm.write(message)

    # ---- eval ----------------------------------------------------------------------------------
    def evaluate(self, final: bool = False) -> dict:
        """Scores the FIXED eval set, split over processes; the main process logs and returns metrics."""
        with faults.phase("eval"):
            return self._evaluate(final)

    @torch.inference_mode()
    def _evaluate(self, final: bool) -> dict:
        model = self.accelerator.unwrap_model(self.model)  # no DDP: shards may differ in length
        model.eval()
        mine = list(range(self.rank, len(self.eval_ds), self.world))
        rows = select(self.eval_ds, mine)
        rows.sort(key=lambda r: -len(r["chosen_ids"]) - len(r["rejected_ids"]))  # minimal padding
        results = []
        size = self.cfg.eval_batch_size
        for i in range(0, len(rows), size):
            batch = self.collate(rows[i:i + size])
            chosen, rejected = self._scores(model, batch)
            results += [(idx, sub, float(m), c, r) for idx, sub, m, c, r in zip(
                batch["index"], batch["subset"], batch["margin"], chosen.float().tolist(), rejected.float().tolist())]
            faults.kill_point("eval", self.n_evals + 1)
        self.n_evals += 1
        model.train()
        everything = sorted(gather_object(results))
        self.state.last_eval_examples = self.state.examples
        record = self.eval_metrics(everything)
        record = {"split": "eval", "step": self.state.step, "examples": self.state.examples, **record,
                  "world_size": self.world}
        self.tracker.log(record)
        self.last_eval = record
        if final and self.cfg.write_predictions and self.accelerator.is_main_process:
            lines = "".join(json.dumps({"chosen": c, "rejected": r}) + "\n" for _, _, _, c, r in everything)
            checkpoint.atomic_write_text(os.path.join(self.run_dir, "generated_predictions.jsonl"), lines)
        return record

    def _scores(self, model, batch):
        return self.forward(batch, model=model)

    def eval_metrics(self, results: list) -> dict:
        """results: (index, subset, margin, chosen score, rejected score) for every eval pair."""
        chosen = torch.tensor([r[3] for r in results])
        rejected = torch.tensor([r[4] for r in results])
        margin = torch.tensor([r[2] for r in results])
        loss = self.loss(chosen, rejected, {"margin": margin, "has_margin": bool(margin.any())})
        sums = pair_metrics(chosen, rejected)
        n = sums["n"]
        rewards = torch.cat([chosen, rejected])
        record = {"loss": loss.item(), "accuracy": sums["correct"] / n, "margin": sums["margin"] / n,
                  "chosen": sums["chosen"] / n, "rejected": sums["rejected"] / n,
                  "reward_min": rewards.min().item(), "reward_mean": rewards.mean().item(),
                  "reward_max": rewards.max().item(), "n_pairs": n}
        for subset in sorted({r[1] for r in results}):
            keep = torch.tensor([r[1] == subset for r in results])
            record[f"accuracy/{subset}"] = (chosen[keep] > rejected[keep]).float().mean().item()
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

        def finish():
            checkpoint.save(tmp, acc.unwrap_model(self.model), self.optimizer, self.scheduler, self.state)
            self.n_saves += 1
            faults.kill_point("save", self.n_saves)  # files written, marker not yet: a torn checkpoint
            checkpoint.mark_complete_and_publish(tmp, final_dir)
            checkpoint.prune(self.run_dir, self.cfg.keep_last_n_checkpoints)

        with faults.phase("save"):
            what = f"checkpoint {final_dir}"
            self._save_part(what, tmp, start if acc.is_main_process else None)
            self._save_part(what, tmp, lambda: checkpoint.save_rng(tmp, self.rank))  # every process's RNG
            self._save_part(what, tmp, finish if acc.is_main_process else None)  # the marker after all RNG files

    def _save_part(self, what: str, tmp: str, work):
        """Runs this process's part of a save, then waits for the others. If a write failed on any
        process (a full disk, a read-only dir), the temporary dir is removed, so it neither keeps
        the space nor looks like a checkpoint, and every process stops with the same line.
        Nothing else is touched: the previous checkpoint stays complete and resumable."""
        error = None
        try:
            if work is not None:
                work()
        except (OSError, RuntimeError, SafetensorError) as err:  # torch.save reports ENOSPC as RuntimeError
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
        self.state = checkpoint.load(path, model, self.optimizer, self.scheduler, self.rank)
        self._say(f"resumed from {path} at step {self.state.step} ({self.state.examples} pairs seen)")

    def save_final(self, final_metrics: dict):
        """FINAL/: save_pretrained weights + tokenizer + metrics.json, written under a temp name."""
        acc = self.accelerator
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.model)
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # checked on every process (the weights are replicated), so all stop together
            raise NonFiniteError(f"non-finite weights ({bad[0]}...): FINAL not written")
        tmp = os.path.join(self.run_dir, ".tmp-FINAL")

        def write():
            shutil.rmtree(tmp, ignore_errors=True)
            self.tracker.plot()
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            metrics = {**final_metrics, "steps": self.state.step, "train_examples": self.state.examples,
                       "skipped_steps": self.state.skipped_steps, "world_size": self.world,
                       **{f"data_{k}": v for k, v in self.data_counts.items()}}
            checkpoint.atomic_write_text(os.path.join(tmp, "metrics.json"), json.dumps(metrics, indent=1))
            checkpoint.mark_complete_and_publish(tmp, os.path.join(self.run_dir, "FINAL"))

        with faults.phase("save", after="done"):
            self._save_part(f"{self.run_dir}/FINAL", tmp, write if acc.is_main_process else None)
        self._say(f"final eval accuracy {final_metrics['accuracy']:.3f}; saved {self.run_dir}/FINAL")

    def cleanup(self, failed: bool = False):
        self.tracker.finish(exit_code=1 if failed else 0)


class PairedPreferenceTrainer(BasicTrainer):
    """Chosen and rejected go through the model in ONE forward: half the kernel launches."""

    def forward(self, batch: dict, model=None):
        model = model if model is not None else self.model
        device = self.accelerator.device
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        scores = model(**inputs)
        n = len(batch["index"])
        return scores[:n], scores[n:]


class BradleyTerryTrainer(PairedPreferenceTrainer):
    """-log sigmoid(s_c - s_r - margin) + centering; no reference model."""

    policy_hf_model_class = AutoModelForBradleyTerry
    use_reference_model = False

    def loss(self, chosen, rejected, batch: dict) -> torch.Tensor:
        margin = batch["margin"].to(chosen.device) if batch.get("has_margin") else None
        return bradley_terry_loss(chosen, rejected, margin, self.cfg.loss.center_rewards_coefficient)
