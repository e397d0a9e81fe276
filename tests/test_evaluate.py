"""python -m train.evaluate and the report it shares with training's final eval (train/report.py).

The metrics are checked on hand-made pairs; the command runs on the shared tiny run
(tests/conftest.py), in-process for 1 process and under accelerate for 2.
"""
import contextlib
import io
import json
import math
import os

import pytest

from tests.conftest import LAUNCH, heavy_imports, main_in_process, python
from train import evaluate as evaluate_module
from train import report


def pair(chosen, rejected, source="s", subset="a", chosen_len=5, rejected_len=5):
    return {"chosen": chosen, "rejected": rejected, "source": source, "subset": subset,
            "chosen_len": chosen_len, "rejected_len": rejected_len}


def logit(p):
    return math.log(p / (1 - p))


# ---- the metrics on hand-made pairs -------------------------------------------------------------------
def test_a_tie_counts_as_wrong_overall_and_per_group():
    pairs = [pair(1.0, 0.0, subset="a"), pair(0.5, 0.5, subset="a"), pair(0.0, 1.0, source="t", subset="b"),
             pair(2.0, 1.0, source="t", subset="b")]
    r = report.preference_report(pairs)
    assert (r["n_pairs"], r["accuracy"], r["ties"]) == (4, 0.5, 1)
    assert r["margin"] == pytest.approx((1 + 0 - 1 + 1) / 4)
    assert r["by_subset"]["a"] == {"n": 2, "accuracy": 0.5, "margin": 0.5, "ties": 1}
    assert r["by_source"] == {"s": {"n": 2, "accuracy": 0.5, "margin": 0.5, "ties": 1},
                              "t": {"n": 2, "accuracy": 0.5, "margin": 0.0, "ties": 0}}


def test_ece_and_brier_on_known_values():
    # predicted winner's probabilities 0.775 (right), 0.775 (wrong: chosen got 0.225), 0.925 (right), 0.5 (a tie)
    d = [logit(0.775), -logit(0.775), logit(0.925), 0.0]
    r = report.preference_report([pair(x / 2, -x / 2) for x in d])
    # (pairs, accuracy, confidence) per bin: [0.75, 0.8) 2, 0.5, 0.775; [0.9, 0.95) 1, 1.0, 0.925;
    # [0.5, 0.55) 1, 0, 0.5
    assert r["ece"] == pytest.approx(2 / 4 * 0.275 + 1 / 4 * 0.075 + 1 / 4 * 0.5)
    assert r["brier"] == pytest.approx((0.225 ** 2 + 0.775 ** 2 + 0.075 ** 2 + 0.5 ** 2) / 4)
    bins = r["calibration"]["bins"]
    assert len(bins) == 10 and bins[0]["lo"] == 0.5 and bins[-1]["hi"] == pytest.approx(1.0)
    assert [b["n"] for b in bins] == [1, 0, 0, 0, 0, 2, 0, 0, 1, 0]
    assert bins[5]["accuracy"] == 0.5 and bins[5]["mean_confidence"] == pytest.approx(0.775)
    # large margins neither overflow nor leave the last bin
    big = report.calibration([1000.0, -1000.0], [0.0, 0.0])
    assert big["bins"][-1]["n"] == 2 and big["ece"] == pytest.approx(0.5) and big["brier"] == pytest.approx(0.5)


def test_spearman_on_known_values():
    # ranks of y: 1, 2, 3.5, 5, 3.5 (the two 7s share ranks 3 and 4): r = 8 / sqrt(10 * 9.5)
    assert report.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert report.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert report.spearman([1, 2, 3], [3, 1, 0]) == pytest.approx(-1.0)
    assert report.spearman([1, 2, 3], [4, 4, 4]) is None and report.spearman([1], [2]) is None
    assert list(report.average_ranks([3.0, 1.0, 3.0, 2.0])) == [3.5, 1.0, 3.5, 2.0]


def test_length_split_and_correlation():
    pairs = [pair(1.0, 0.0, chosen_len=9, rejected_len=3),   # chosen longer, right
             pair(0.0, 1.0, chosen_len=8, rejected_len=2),   # chosen longer, wrong
             pair(1.0, 0.0, chosen_len=2, rejected_len=7),   # chosen shorter, right
             pair(0.2, 0.1, chosen_len=4, rejected_len=4)]   # equal length, right
    length = report.preference_report(pairs)["length"]
    assert length["chosen_longer"] == {"n": 2, "accuracy": 0.5, "margin": 0.0, "ties": 0}
    assert length["chosen_shorter"]["n"] == 1 and length["chosen_shorter"]["accuracy"] == 1.0
    assert length["equal_length"]["n"] == 1 and length["equal_length"]["accuracy"] == 1.0
    rewards, lengths = [1.0, 0.0, 1.0, 0.2, 0.0, 1.0, 0.0, 0.1], [9, 8, 2, 4, 3, 2, 7, 4]
    assert length["spearman_reward_length"] == pytest.approx(report.spearman(rewards, lengths))
    only_longer = report.preference_report(pairs[:1])["length"]
    assert only_longer["equal_length"] == {"n": 0, "accuracy": None, "margin": None, "ties": 0}


def test_response_lengths_leave_out_the_shared_prefix():
    assert report.response_lengths([1, 2, 3, 4, 9], [1, 2, 3, 5, 6, 9]) == (2, 3)
    assert report.response_lengths([7, 8], [1, 2, 3]) == (2, 3)


def test_report_files_and_their_names(tmp_path):
    pairs = [pair(1.0, 0.0), pair(float("nan"), 0.5), pair(0.3, 0.3)]
    r = report.preference_report(pairs)
    report.write_report(str(tmp_path / "eval_report.json"), r, pairs)
    report.write_report(str(tmp_path / "other.json"), r, pairs)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["eval_report.json", "other.json", "other_reliability.png", "other_reward_hist.png",
                     "reliability.png", "reward_hist.png"]
    assert all((tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names if n.endswith(".png"))
    assert json.loads((tmp_path / "eval_report.json").read_text())["n_pairs"] == 3
    assert "ECE" in report.format_table(r)


# ---- the command ----------------------------------------------------------------------------------------
def run_in_process(capsys, *args):
    return main_in_process(evaluate_module.main, capsys, *args)


@pytest.fixture(scope="module")
def one_process(shared_run, tmp_path_factory):
    """evaluate in this process on the shared run's FINAL and its own held-out pairs (48: all of
    them are its eval set). Returns (work dir, report, stdout)."""
    root = tmp_path_factory.mktemp("evaluate")
    out = root / "one" / "report.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            evaluate_module.main(["--reward_model_path", str(shared_run / "FINAL"), "--out", str(out),
                                  f"cache_dir={root}"])
    except SystemExit as exit:
        raise AssertionError(f"exit {exit.code}: {stderr.getvalue()[-3000:]}")
    return root, json.loads(out.read_text()), stdout.getvalue()


def test_final_holds_the_report_and_evaluate_reproduces_it(shared_run, one_process):
    root, result, stdout = one_process
    final = shared_run / "FINAL"
    for name in ("eval_report.json", "reliability.png", "reward_hist.png"):
        assert (final / name).is_file(), name
    trained = json.loads((final / "eval_report.json").read_text())
    metrics = json.loads((final / "metrics.json").read_text())
    assert trained["accuracy"] == metrics["accuracy"] and trained["n_pairs"] == metrics["n_pairs"] == 48
    assert result["n_pairs"] == 48 and result["split"] == "test" and result["world_size"] == 1
    assert result["accuracy"] == trained["accuracy"]
    assert result["by_subset"].keys() == trained["by_subset"].keys() and set(result["by_source"]) == {"synthetic"}
    for key in ("margin", "ece", "brier", "chosen_mean", "rejected_mean"):
        assert result[key] == pytest.approx(trained[key], abs=1e-4), key
    for bucket in report.LENGTH_BUCKETS:  # lengths come from the same token ids
        assert result["length"][bucket]["n"] == trained["length"][bucket]["n"] > 0, bucket
    assert result["length"]["spearman_reward_length"] == \
        pytest.approx(trained["length"]["spearman_reward_length"], abs=1e-3)
    assert (root / "one" / "report_reliability.png").is_file() and (root / "one" / "report_reward_hist.png").is_file()
    assert "accuracy" in stdout and "ECE" in stdout and "scored by 1 process(es)" in stdout


def test_two_processes_report_what_one_reports(shared_run, one_process):
    root, one, _ = one_process
    out = root / "two" / "report.json"
    proc = python([*LAUNCH, "--config_file", "accelerate_config/ddp_cpu_2proc.yaml", "-m", "train.evaluate",
                   "--reward_model_path", str(shared_run / "FINAL"), "--out", str(out), f"cache_dir={root}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored by 2 process(es)" in proc.stdout  # really 2 processes, not 2 copies of rank 0
    two = json.loads(out.read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("n_pairs", "accuracy", "ties"):
        assert two[key] == one[key], key
    for key in ("by_source", "by_subset"):
        assert {k: (g["n"], g["accuracy"]) for k, g in two[key].items()} == \
               {k: (g["n"], g["accuracy"]) for k, g in one[key].items()}, key
    for key in ("margin", "ece", "brier", "reward_mean"):
        assert two[key] == pytest.approx(one[key], abs=1e-5), key
    assert two["length"]["spearman_reward_length"] == pytest.approx(one["length"]["spearman_reward_length"], abs=1e-6)


def test_a_checkpoint_on_the_fixed_eval_subset(shared_run, one_process, capsys):
    root, one, _ = one_process
    out = root / "ckpt" / "eval_report.json"
    code, stdout, err = run_in_process(capsys, "--reward_model_path", shared_run / "checkpoints" / "step-10",
                                       "--eval_subset", "--out", out, "n_eval_examples=20", f"cache_dir={root}")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["n_pairs"] == 20 and "fixed eval subset" in result["pairs"]
    from omegaconf import OmegaConf
    run_model = OmegaConf.load(shared_run / "config.yaml").model
    assert result["formatting"]["max_length"] == run_model.max_length  # the run's formatting
    assert result["formatting"]["truncation"] == run_model.truncation
    assert (root / "ckpt" / "reliability.png").is_file() and "scored by 1 process(es)" in stdout


@pytest.mark.parametrize("args,message", [
    (["--reward_model_path", "/no/such/model"], "--reward_model_path /no/such/model: no such directory"),
    (["--reward_model_path", "{final}", "lr=1"], "'lr=1': python -m train.evaluate takes only data overrides"),
    (["--reward_model_path", "{final}", "datasets.synthetic.n_tset=3"], "n_tset"),
    (["--reward_model_path", "{final}", "--data", "/no/such.jsonl"], "--data /no/such.jsonl: no such file"),
    (["--reward_model_path", "{final}", "--split", "train", "--eval_subset"], "--eval_subset picks held-out pairs"),
    (["--reward_model_path", "{final}", "datasets=[jsonl]"], "datasets.jsonl"),  # no file named
])
def test_bad_input_gives_one_line(shared_run, capsys, tmp_path, args, message):
    args = [a.replace("{final}", str(shared_run / "FINAL")) for a in args]
    code, stdout, err = run_in_process(capsys, *args, "--out", tmp_path / "r.json", f"cache_dir={tmp_path}")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r.json").exists()


def test_a_mistake_is_reported_before_torch_is_imported(shared_run, tmp_path):
    """In a fresh interpreter, as a user types it: the arguments, the overrides and the model dir are
    checked before torch, transformers and datasets are imported (about 9 s)."""
    final = shared_run / "FINAL"
    for args, message in ((["--reward_model_path", tmp_path / "nope"], f"--reward_model_path {tmp_path / 'nope'}: no such"),
                          (["--reward_model_path", final, "lr=1"], "'lr=1': python -m train.evaluate takes only data"),
                          (["--reward_model_path", final, "model.dtype=float8"], "model.dtype 'float8' is not one of")):
        proc = heavy_imports(["-m", "train.evaluate", *args, "--out", tmp_path / "r.json", f"cache_dir={tmp_path}"])
        assert (proc.returncode, proc.stdout) == (2, "[]\n") and proc.stderr.startswith("error: ") and \
            proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_default_report_dir_names_the_model_overrides():
    # a rerun with another max_length writes beside the first report, not over it
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"datasets": {"jsonl": {"path": "data/hh.jsonl"}}})
    plain = evaluate_module.default_out("runs/rm/FINAL", cfg, "all", False)
    longer = evaluate_module.default_out("runs/rm/FINAL", cfg, "all", False, ["max_length=1024"])
    assert plain == "eval-report/rm-FINAL-hh-all/eval_report.json"
    assert longer == "eval-report/rm-FINAL-hh-all-max_length=1024/eval_report.json"


def test_an_unwritable_out_is_found_before_scoring(tmp_path):
    # by trying to write there: os.access tells root that /proc is writable
    assert evaluate_module.check_out(str(tmp_path / "r" / "report.json")) is None
    assert list((tmp_path / "r").iterdir()) == []  # the trial file is gone
    if os.path.isdir("/proc/self"):
        assert evaluate_module.check_out("/proc/x.json").startswith("cannot write the report /proc/x.json: ")
