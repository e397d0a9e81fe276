"""launch.py end to end: run dir contract, FINAL loads in plain transformers, 2 processes == 1."""
import argparse
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import (PYTHON, ROOT, SHARED_RUN, TINY, accelerate_launch, env, error_line, final_metrics,
                            final_weights, heavy_imports, launch, launch_each, max_gap, metrics)


def test_tiny_llama_run_writes_the_run_dir_and_a_final_that_transformers_loads(shared_run):
    run = shared_run
    for path in ("config.yaml", "metrics.jsonl", "FINAL/model.safetensors", "FINAL/config.json",
                 "FINAL/tokenizer.json", "FINAL/metrics.json", "plots/loss.png", "plots/accuracy.png",
                 "plots/margin.png", "generated_predictions.jsonl"):
        assert (run / path).is_file(), path
    mask = os.umask(0)
    os.umask(mask)  # the tests' runs inherit it: FINAL's weights are as readable as any file they write
    for path in (run / "FINAL").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.model.init_config.model_type == "llama" and "${" not in (run / "config.yaml").read_text()

    records = metrics(run)
    evals = [r for r in records if r["split"] == "eval"]
    train = [r for r in records if r["split"] == "train"]
    assert evals[0]["examples"] == 0 and evals[-1]["examples"] == train[-1]["examples"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    for key in ("loss", "accuracy", "margin", "chosen", "rejected", "grad_norm", "lr", "pairs_per_s",
                "tokens_per_s", "examples"):
        assert key in train[-1], key
    for key in ("reward_min", "reward_mean", "reward_max", "accuracy/grounded_fact", "accuracy/refusal"):
        assert key in evals[-1], key
    final = final_metrics(run)
    assert final["world_size"] == 1 and final["accuracy"] == evals[-1]["accuracy"]
    # launch.log keeps what the run printed, with timestamps: the data, every eval, the final line
    log = (run / "launch.log").read_text()
    assert re.search(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]\[train\]\[INFO\] - data: \d+ train pairs", log, re.M), log
    assert f"eval at step {evals[0]['step']}: accuracy {evals[0]['accuracy']:.3f}" in log
    assert f"final eval accuracy {final['accuracy']:.3f}" in log

    # FINAL is a plain HF classifier: scoring the eval pairs with it gives the trainer's scores.
    from train.build import fixed_eval_indices
    from train.data.formatting import encode
    from train.data.loader import load_examples
    _, test = load_examples(cfg, log=lambda *a: None)
    eval_pairs = [test[i] for i in fixed_eval_indices(len(test), cfg.n_eval_examples)]
    model = AutoModelForSequenceClassification.from_pretrained(run / "FINAL")
    tokenizer = AutoTokenizer.from_pretrained(run / "FINAL")
    assert model.config.num_labels == 2
    predictions = [json.loads(line) for line in (run / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(eval_pairs) == cfg.n_eval_examples
    with torch.no_grad():
        for pair, pred in list(zip(eval_pairs, predictions))[:12]:
            for side in ("chosen", "rejected"):
                ids = encode(tokenizer, pair.prompt, getattr(pair, side), cfg.model.max_length,
                             cfg.model.max_prompt_length)["input_ids"]
                score = model(input_ids=torch.tensor([ids])).logits[0, 1].item()
                assert score == pytest.approx(pred[side], abs=1e-4)
    # reward extremes are true extremes over the eval set
    scores = [p[s] for p in predictions for s in ("chosen", "rejected")]
    assert evals[-1]["reward_max"] == pytest.approx(max(scores), abs=1e-5)
    assert evals[-1]["reward_min"] == pytest.approx(min(scores), abs=1e-5)


def test_a_fresh_interpreter_trains_what_the_tests_zygote_trains(shared_run, tmp_path):
    """Most runs in this suite start in tests/zygote.py, a pre-imported Python that forks per run.
    This one starts as `python launch.py` does, and ends with the same weights and metrics, bit for bit."""
    args = [*SHARED_RUN, "write_predictions=true", f"cache_dir={tmp_path}", "exp_name=shared"]
    subprocess.run([PYTHON, "launch.py", *args], cwd=ROOT, env=env(), check=True, capture_output=True, timeout=600)
    fresh, forked = final_weights(tmp_path / "shared"), final_weights(shared_run)
    assert fresh.keys() == forked.keys() and all(torch.equal(fresh[k], forked[k]) for k in fresh)
    curve = lambda run: [(r["split"], r["step"], r["loss"], r["accuracy"]) for r in metrics(run)]  # noqa: E731
    assert curve(tmp_path / "shared") == curve(shared_run)
    predictions = "generated_predictions.jsonl"
    assert (tmp_path / "shared" / predictions).read_text() == (shared_run / predictions).read_text()


def test_minilm_short_run_lowers_eval_loss(cache):
    launch(["model=minilm", "datasets.synthetic.n_train=320", "datasets.synthetic.n_test=64",
            "n_eval_examples=64", "batch_size=16", "microbatch_size=16", "eval_every=160", "lr=2e-4", "warmup=0",
            f"cache_dir={cache}", "exp_name=mini"])
    evals = [r for r in metrics(Path(cache) / "mini") if r["split"] == "eval"]
    assert evals[0]["examples"] == 0 and evals[-1]["examples"] == 320
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.05
    assert evals[-1]["accuracy"] > evals[0]["accuracy"]


def test_two_processes_equal_one_process(cache):
    args = [*TINY, "batch_size=16", "microbatch_size=4", "lr=1e-3", f"cache_dir={cache}"]
    launch([*args, "exp_name=one"])
    accelerate_launch([*args, "exp_name=two"], nproc=2)
    one, two = Path(cache) / "one", Path(cache) / "two"
    assert final_metrics(one)["world_size"] == 1
    assert final_metrics(two)["world_size"] == 2  # two processes really ran
    assert all(r["world_size"] == 2 for r in metrics(two))
    w1, w2 = final_weights(one), final_weights(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-4), name
    moved = [r for r in metrics(one) if r["split"] == "train"][-1]["grad_norm"]
    assert moved > 0
    t1 = [r["loss"] for r in metrics(one) if r["split"] == "train"]
    t2 = [r["loss"] for r in metrics(two) if r["split"] == "train"]
    assert t1 == pytest.approx(t2, abs=1e-5)


def test_compile_trains_what_eager_trains(cache):
    """compile=true (torch.compile of the model body, dynamic shapes, packed attention left out of
    the graph) is the same training: 4 steps at a learning rate that moves the weights, here with
    LoRA adapters (they move q/v by about 2e-3, far past the 1e-4 allowed). Without adapters, the
    compiled forward and backward are compared with eager in tests/test_packing.py."""
    args = ["model=tiny-llama", "datasets.synthetic.n_train=64", "datasets.synthetic.n_test=16",
            "n_eval_examples=16", "batch_size=16", "microbatch_size=8", "do_first_eval=false", "lr=1e-3",
            f"cache_dir={cache}", "model.peft.enabled=true"]
    launch([*args, "exp_name=eager"])
    launch([*args, "exp_name=compiled", "compile=true"])
    eager, compiled = Path(cache) / "eager", Path(cache) / "compiled"
    assert max_gap(final_weights(eager), final_weights(compiled)) < 1e-4
    assert final_metrics(compiled)["loss"] == pytest.approx(final_metrics(eager)["loss"], abs=1e-5)
    train = [r for r in metrics(eager) if r["split"] == "train"]
    assert len(train) == 4 and train[-1]["grad_norm"] > 0


MISTAKES = [
    (["lr=-1"], r"lr must be more than 0, got -1.0"),
    (["lrr=1e-4"], r"unknown config key 'lrr' \(did you mean 'lr'\?\)"),
    (["model.max_lenght=64"], r"unknown config key 'model.max_lenght' \(did you mean 'max_length'\?\)"),
    (["model=llama"], r"config key 'model.name_or_path' is required"),
    (["datasets=[jsonl]"], r"datasets.jsonl.path' is required"),
    (["batch_size=30", "microbatch_size=8"], r"batch_size \(30\) must be microbatch_size"),
    (["scheduler=cosin"], r"scheduler 'cosin' is not one of linear, cosine"),
    (["batch_size=abc"], r"config key 'batch_size' must be a whole number, got 'abc'"),
    (["loss.center_rewards_coefficient=high"], r"'loss.center_rewards_coefficient' must be a number, got 'high'"),
    (["model.dtype=bf16"], r"model.dtype 'bf16' is not one of float32, bfloat16"),
    (["model=lama"], r"unknown model 'lama' \(did you mean 'llama'\?\)"),
    (["n_examples=5"], r"n_examples \(5\) must be at least batch_size \(32\)"),
    (["model.name_or_path=${pkg:not_a_package,model}"], r"package 'not_a_package' is not installed"),
    (["model=tiny-llama", "datasets.synthetic.n_test=0"], r"0 held-out pairs: both must be at least 1"),
    (["model=tiny-llama", "datasets.synthetic.n_train=12"], r"12 training pairs make no full batch of batch_size=32"),
]


def test_user_mistakes_give_one_clear_line(cache):
    procs = launch_each([[*args, f"cache_dir={cache}"] for args, _ in MISTAKES])
    for (args, expected), proc in zip(MISTAKES, procs):
        line = error_line(proc)
        assert re.search(expected, line), line
    # a mistake found once Hydra has made the run dir is also kept in its launch.log
    logs = "".join(path.read_text() for path in Path(cache).glob("*/launch.log"))
    assert "[train][ERROR] - lr must be more than 0, got -1.0" in logs
    # Two cases in a fresh interpreter too, as a user types them: the one-line exit is not an artefact
    # of launch_each, and the config is checked before torch, transformers or datasets are imported,
    # so a mistake is reported in about a second rather than ten.
    for override, message in (("lrr=1e-4", "unknown config key 'lrr' (did you mean 'lr'?)"),
                              ("lr=-1", "lr must be more than 0, got -1.0")):
        proc = heavy_imports(["launch.py", override, f"cache_dir={cache}"])
        assert (proc.returncode, proc.stderr, proc.stdout) == (2, f"error: {message}\n", "[]\n")


def test_epochs_and_n_examples_count_whole_batches(cache):
    # 40 pairs, batch 16: 2 steps per epoch (8 pairs dropped each epoch), 3 epochs -> 6 steps
    args = ["model=tiny-llama", "datasets.synthetic.n_train=40", "datasets.synthetic.n_test=16", "n_eval_examples=16",
            "batch_size=16", "microbatch_size=8", "n_epochs=3", f"cache_dir={cache}"]
    launch([*args, "exp_name=epochs"])
    assert [r["step"] for r in metrics(Path(cache) / "epochs") if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    capped = launch([*args, "exp_name=capped", "n_examples=70"])  # 70 pairs -> 4 whole steps
    assert final_metrics(Path(cache) / "capped")["train_examples"] == 64
    assert "learning rate is 0" not in capped.stdout
    # one step: its warmup keeps the learning rate at 0, so the run is told it trains nothing
    one = launch([*args, "exp_name=one", "n_examples=16"])
    assert "warning: the learning rate is 0 at every one of the 1 optimizer step(s) (warmup=0.1, scheduler=linear)" \
        in one.stdout
    assert [r["lr"] for r in metrics(Path(cache) / "one") if r["split"] == "train"] == [0.0]


def test_readme_benchmark_commands_take_only_options_the_script_has():
    """Every scripts/benchmark.py command the README shows parses (one had kept options that were
    renamed away); the commands themselves run for minutes to hours, so they are not run here."""
    from scripts import benchmark
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"scripts/benchmark\.py([^`#|\n]*)", text)
    assert len(commands) >= 5
    for command in commands:
        parser = argparse.ArgumentParser()
        benchmark.add_arguments(parser)
        _, unknown = parser.parse_known_args(shlex.split(command))
        assert not unknown, f"README: scripts/benchmark.py{command}: {unknown}"


def test_readme_commands_run_in_reduced_form(cache):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    train_cmd, test_cmd = [line.split("#")[0].strip() for line in block.strip().splitlines()[:2]]
    assert train_cmd.startswith("bash scripts/setup.sh") and ".venv/bin/python launch.py" in train_cmd
    assert test_cmd.startswith("bash scripts/setup.sh") and "pytest" in test_cmd
    assert "pytest" in (ROOT / ".ci" / "run").read_text() and "scripts/setup.sh" in (ROOT / ".ci" / "run").read_text()
    # The train command after setup, on less data so the test stays short.
    launch_args = train_cmd.split(".venv/bin/python launch.py", 1)[1].split()
    launch([*launch_args, f"cache_dir={cache}", "datasets.synthetic.n_train=64", "datasets.synthetic.n_test=32",
            "n_eval_examples=32"])
    exp = next(a.split("=", 1)[1] for a in launch_args if a.startswith("exp_name="))
    assert (Path(cache) / exp / "FINAL" / "metrics.json").is_file()
    # setup.sh is valid bash and installs torch before anything else
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")]).returncode == 0
    assert setup.index("torch==2.13.0") < setup.index('-e ".[')
