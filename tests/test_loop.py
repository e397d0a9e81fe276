"""The training loop itself (train/trainers.py), in-process and in seconds: a stub scorer instead of
a transformer, a tiny in-memory dataset in the tokenised format, one CPU process."""
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from accelerate import Accelerator
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_model
from torch import nn

from train import checkpoint
from train.config import register
from train.trainers import BasicTrainer, BradleyTerryTrainer, NonFiniteError

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 16


class StubScorer(nn.Module):
    """A reward per sequence: the sum of one learned weight per token, plus a bias."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)  # every instance starts from the same weights
        self.token_weight = nn.Parameter(torch.randn(VOCAB, generator=generator) * 0.1)
        self.bias = nn.Parameter(torch.zeros(1))
        self.poison = False  # scores become NaN
        self.forwards = 0
        self.on_forward = None  # called with the forward count, e.g. to send a signal mid-step

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        self.forwards += 1
        if self.on_forward:
            self.on_forward(self.forwards)
        scores = (self.token_weight[input_ids] * attention_mask).sum(-1) + self.bias
        return scores * float("nan") if self.poison else scores

    def save_pretrained(self, path):  # what FINAL/ needs of a model
        os.makedirs(path, exist_ok=True)
        save_model(self, os.path.join(path, "model.safetensors"))


TOKENIZER = SimpleNamespace(pad_token_id=0, save_pretrained=lambda path: None)


def pairs(n: int, seed: int) -> datasets.Dataset:
    """n pairs in the format of train/data/loader.py tokenize(): chosen rows hold token 1 (which
    training learns to like), lengths vary (so there is padding), every third pair has a margin."""
    g = torch.Generator().manual_seed(seed)

    def ids(first):
        return [first] + torch.randint(2, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()

    return datasets.Dataset.from_dict({
        "chosen_ids": [ids(1) for _ in range(n)], "rejected_ids": [ids(2) for _ in range(n)],
        "chosen_types": [None] * n, "rejected_types": [None] * n,
        "margin": [0.5 if i % 3 == 0 else None for i in range(n)],
        "subset": ["a" if i % 2 else "b" for i in range(n)], "index": list(range(n)), "truncated": [False] * n})


TRAIN, EVAL = pairs(32, seed=1), pairs(8, seed=2)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def make(tmp_path, accelerator, *overrides, trainer=BradleyTerryTrainer, model=None, resume_from=None):
    """A trainer as build.py makes one, from a config composed from config/ (4 steps per epoch)."""
    register()
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=[
            f"cache_dir={tmp_path}", "exp_name=loop", "batch_size=8", "microbatch_size=4", "lr=0.05", "warmup=0",
            "do_first_eval=false", "eval_every=1000000", "n_eval_examples=8", "eval_batch_size=8", *overrides])
    os.makedirs(cfg.local_run_dir, exist_ok=True)
    return trainer(cfg, accelerator, model or StubScorer(), TOKENIZER, TRAIN, EVAL, cfg.local_run_dir,
                   resume_from=resume_from)


def weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def one_step(trainer):
    return trainer.train_step(iter(trainer.train_loader()))


def test_two_microbatches_of_four_make_the_same_update_as_one_of_eight(tmp_path, accelerator):
    # SGD: the update is proportional to the gradient (Adam's first step would hide a wrong scale)
    two = make(tmp_path / "two", accelerator, "optimizer=SGD", "microbatch_size=4")
    one = make(tmp_path / "one", accelerator, "optimizer=SGD", "microbatch_size=8")
    assert (two.accumulation, one.accumulation) == (2, 1)
    before = weights(one)
    (record_two, _), (record_one, _) = one_step(two), one_step(one)
    after_two, after_one = weights(two), weights(one)
    assert not torch.allclose(after_one["token_weight"], before["token_weight"])  # it did move
    for name in before:
        assert torch.allclose(after_two[name], after_one[name], rtol=0, atol=1e-6), name
    assert record_two["loss"] == pytest.approx(record_one["loss"], abs=1e-6)
    assert (two.state.step, two.state.examples) == (one.state.step, one.state.examples) == (1, 8)


def test_a_non_finite_step_is_skipped_and_counted_with_skip(tmp_path, accelerator):
    trainer = make(tmp_path, accelerator, "on_nonfinite=skip")
    trainer.model.poison = True
    before = weights(trainer)
    record, _ = one_step(trainer)
    assert trainer.state.skipped_steps == record["skipped_steps"] == 1 and trainer.state.step == 1
    assert all(torch.equal(before[k], v) for k, v in weights(trainer).items())


def test_a_non_finite_step_stops_the_run_naming_the_step_with_stop(tmp_path, accelerator):
    trainer = make(tmp_path, accelerator, "on_nonfinite=stop")
    one_step(trainer)
    trainer.model.poison = True
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient at step 2; last good checkpoint: none"):
        trainer.train_step(iter(trainer.train_loader()))


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_sees_the_same_data_and_ends_identical(
        tmp_path, accelerator, monkeypatch):
    monkeypatch.setattr(BasicTrainer, "stopped_by_signal", False)  # restored after the test
    args = ("n_epochs=2",)  # 8 steps: the resume crosses an epoch boundary
    whole = make(tmp_path / "whole", accelerator, *args)
    assert whole.train() == "done"

    stopped = make(tmp_path / "stopped", accelerator, *args)
    handler = signal.getsignal(signal.SIGTERM)
    # the third forward is the first microbatch of step 2: the step finishes, then the run stops
    stopped.model.on_forward = lambda n: n == 3 and os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.train() == "preempted"
    assert signal.getsignal(signal.SIGTERM) == handler  # the previous handler is back
    run_dir = Path(stopped.run_dir)
    assert [Path(p).name for p in checkpoint.checkpoint_dirs(run_dir)[0]] == ["step-2"]
    assert not (run_dir / "FINAL").exists()

    resumed = make(tmp_path / "stopped", accelerator, *args, resume_from=str(run_dir / "checkpoints" / "step-2"))
    assert (resumed.state.step, resumed.state.examples) == (2, 16)
    uninterrupted = make(tmp_path / "fresh", accelerator, *args)
    for step in range(resumed.total_steps):
        assert resumed.microbatches(step) == uninterrupted.microbatches(step)
    # what the resumed loader yields is what the uninterrupted one yields from step 2 on
    later = [b["index"] for b in uninterrupted.train_loader()][2 * uninterrupted.accumulation:]
    assert [b["index"] for b in resumed.train_loader()] == later

    assert resumed.train() == "done"
    a, b = (load_file(str(Path(t.run_dir) / "FINAL" / "model.safetensors")) for t in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recording(BradleyTerryTrainer):
    """Bradley-Terry that records what loss() receives."""

    pair_fields = ("margin", "subset")
    calls = []

    def loss(self, chosen, rejected, margin, subset):
        self.calls.append((margin.clone(), list(subset)))
        return super().loss(chosen, rejected, margin)


def test_loss_receives_the_fields_it_names_the_same_way_in_training_and_eval(tmp_path, accelerator):
    trainer = make(tmp_path, accelerator, "microbatch_size=8", trainer=Recording)
    Recording.calls.clear()
    one_step(trainer)
    trainer.evaluate()
    (train_margin, train_subset), (eval_margin, eval_subset) = Recording.calls
    rows = trainer.microbatches(0)[0]
    # a float tensor, 0 where a pair has no margin
    assert train_margin.dtype == eval_margin.dtype == torch.float32
    assert train_margin.tolist() == [0.5 if i % 3 == 0 else 0.0 for i in rows]
    assert train_subset == [TRAIN[i]["subset"] for i in rows]
    assert eval_margin.tolist() == [0.5 if i % 3 == 0 else 0.0 for i in range(len(EVAL))]  # eval pairs by index
    assert eval_subset == EVAL["subset"]


def test_adamw_runs_its_fused_kernel_and_moves_the_weights(tmp_path, accelerator):
    """The default AdamW takes torch's fused kernel (4x faster on CPU); it still trains."""
    trainer = make(tmp_path, accelerator)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper holds it
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["fused"] is True
    before = weights(trainer)
    one_step(trainer)
    assert not torch.allclose(weights(trainer)["token_weight"], before["token_weight"])
