"""The real data behind every figure of scripts/benchmark.py, and the held-out accuracy comparison.

The HH-RLHF file (--real_data) is read by the harness's own `hh` source (implicit prompts; divergent
and empty rows skipped and counted) and shuffled with a fixed seed. From it:
- held_out_split(): a fixed set of test pairs and the training pairs before them, for accuracy;
- fitting_pairs(): the speed pairs, those that neither trainer would cut or drop at max_length
  (our encoding with no truncation, TRL's ids at most max_length), so both train on the same pairs;
- the labeling samples (scripts/bench_label.py).
accuracy() trains this harness and TRL on the same split (each in its own process, through
scripts/bench_train.py) and scores both on the same held-out pairs; a tie counts as wrong.
"""
import importlib.util
import json
import math
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "harmless-base-test.jsonl.gz"


def wilson(correct: int, n: int, z: float = 1.96) -> tuple:
    """95% Wilson score interval of a binomial proportion."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def load_pairs(path: str) -> tuple:
    """([{prompt, chosen, rejected}] in a fixed shuffled order, {skipped rows by reason})."""
    from hydra import compose, initialize_config_dir

    from train.config import register
    from train.data.loader import load_examples

    register()
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=["datasets=[hh]", f"++datasets.hh.path={path}"])
    counts = {}
    train, test = load_examples(cfg, log=lambda *a: None, counts=counts)
    pairs = [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in train + test]
    random.Random(0).shuffle(pairs)
    return pairs, counts


def write_jsonl(path: str, rows: list) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def held_out_split(pairs: list, test_pairs: int, train_pairs: int = None) -> tuple:
    """(training pairs, held-out pairs): the first test_pairs are held out, at most train_pairs of the rest train."""
    if test_pairs >= len(pairs):
        raise ValueError(f"test_pairs {test_pairs}: the file has only {len(pairs)} usable pairs")
    return pairs[test_pairs:][:train_pairs], pairs[:test_pairs]


def fitting_pairs(pairs: list, n: int, tokenizer, max_length: int, trl_eos) -> tuple:
    """The first n pairs that fit max_length for both trainers, with their token counts.

    Fit for this harness: neither side is truncated with max_prompt_length = max_length (our
    encode, the function training uses), and chosen and rejected differ (else it drops the pair).
    Fit for TRL: neither side's ids (as TRL builds them) is longer than max_length (else it drops
    the pair). Skipped when TRL is not installed. Returns (pairs, stats)."""
    from scripts.bench_train import trl_ids, trl_rows
    from train.data.formatting import encode, uses_chat_template

    has_trl = importlib.util.find_spec("trl") is not None
    chat = uses_chat_template(tokenizer)
    eos = trl_eos or tokenizer.eos_token
    kept, stats = [], {"examined": 0, "too_long": 0, "identical": 0, "ours_tokens": 0, "ours_sum_sq": 0,
                       "trl_tokens": 0, "trl_sum_sq": 0, "trl_checked": has_trl}
    for pair in pairs:
        if len(kept) == n:
            break
        stats["examined"] += 1
        sides = [encode(tokenizer, pair["prompt"], pair[s], max_length, max_length, "keep_start")
                 for s in ("chosen", "rejected")]
        if any(e["truncated"] for e in sides):
            stats["too_long"] += 1
            continue
        if sides[0]["input_ids"] == sides[1]["input_ids"]:
            stats["identical"] += 1
            continue
        theirs = []
        if has_trl:  # without TRL, the pairs fit ours only
            row = trl_rows([pair], chat)
            theirs = [len(trl_ids(tokenizer, row["prompt"][0], row[s][0], eos)) for s in ("chosen", "rejected")]
        if any(t > max_length for t in theirs):
            stats["too_long"] += 1
            continue
        kept.append(pair)
        ours = [len(e["input_ids"]) for e in sides]
        stats["ours_tokens"] += sum(ours)
        stats["ours_sum_sq"] += sum(t * t for t in ours)
        stats["trl_tokens"] += sum(theirs)
        stats["trl_sum_sq"] += sum(t * t for t in theirs)
    stats["used"] = len(kept)
    return kept, stats


def accuracy(spec: dict, train_rows: list, test_rows: list, workdir: str, seeds=(0,)) -> dict:
    """This harness and TRL trained on the same real split, each in its own process; both scored
    on the same held-out pairs. TRL drops training pairs longer than max_length; the harness
    truncates them (its default policy), as each does in use."""
    from scripts.bench_train import run_child, run_ours

    spec = dict(spec, train_file=write_jsonl(os.path.join(workdir, "accuracy-train.jsonl"), train_rows),
                test_file=write_jsonl(os.path.join(workdir, "accuracy-test.jsonl"), test_rows), n_test=len(test_rows))
    runs = []
    for seed in seeds:  # interleaved, so a change in machine load hits both alike
        for which in ("ours", "trl"):
            result = (run_ours if which == "ours" else lambda s: run_child("trl", s))(dict(spec, seed=seed))
            if "error" not in result:
                low, high = wilson(round(result["accuracy"] * result["n_test"]), result["n_test"])
                result["ci95"] = [low, high]
            runs.append(dict(result, seed=seed))
    mean = {}
    for which in ("ours", "trl"):
        values = [r["accuracy"] for r in runs if r["trainer"] == which and "error" not in r]
        mean[which] = sum(values) / len(values) if values else None
    difference = None if None in mean.values() else (mean["ours"] - mean["trl"]) * 100
    return {"ours": mean["ours"], "trl": mean["trl"], "ours_minus_trl_points": difference,
            "target": "ours within 1 point of TRL's", "train_pairs": len(train_rows), "test_pairs": len(test_rows),
            "seeds": list(seeds), "runs": runs}
