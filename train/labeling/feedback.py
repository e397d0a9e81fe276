"""Rewards -> feedback: the rows HALOs' labeler writes, the choice of pairs, the output writer.

pairs_for_prompt() and plan_pairs() see only (key, reward) numbers, never texts, so choosing the
pairs of a large file holds one float per sample.
"""
import contextlib
import json
import math
import random
from typing import Optional

import numpy as np

from train import atomic
from train.errors import UserError

FEEDBACK_TYPES = ("scalar", "binary", "pairwise")
PAIR_MODES = ("random", "max", "min")
THRESHOLD_STATS = ("median", "mean")


def parse_threshold(text: Optional[str], feedback_type: str):
    """--threshold: a finite number, 'median' or 'mean'. Defaults: binary median, pairwise 0."""
    if text is None:
        return "median" if feedback_type == "binary" else 0.0
    if text in THRESHOLD_STATS:
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"--threshold must be a number, 'median' or 'mean', got '{text}'")
    return value


def resolve_threshold(threshold, values) -> float:
    """A number stays; 'median'/'mean' is taken over `values` (0 when there are none)."""
    if not isinstance(threshold, str):
        return float(threshold)
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return 0.0
    return float(np.median(values) if threshold == "median" else values.mean())


def scalar_row(sample: dict, reward: float) -> dict:
    return {**sample, "reward": reward, "type": "scalar_feedback"}


def binary_row(sample: dict, reward: float, threshold: float) -> dict:
    """HALOs' binary row; extra sample fields (sample_id, ...) are carried through."""
    return {**sample, "prompt_id": sample.get("prompt_id"), "prompt": sample["prompt"],
            "output": sample["output"], "label": int(reward >= threshold), "reward": reward,
            "type": "binary_feedback"}


def pair_row(a: dict, b: dict, reward_a: float, reward_b: float) -> dict:
    row = {"prompt_id": a["prompt_id"], "prompt": a["prompt"], "output_A": a["output"],
           "output_B": b["output"], "label": int(reward_a > reward_b), "reward_A": reward_a,
           "reward_B": reward_b, "reward_difference": abs(reward_a - reward_b), "type": "pairwise_feedback"}
    if "sample_id" in a and "sample_id" in b:  # lets a pair be traced back to its samples
        row["sample_id_A"], row["sample_id_B"] = a["sample_id"], b["sample_id"]
    return row


# ---- choosing pairs ---------------------------------------------------------------------------------
def pairs_for_prompt(rewards: list, mode: str, threshold: float, rng: random.Random) -> list:
    """Pairs (i, j) of positions in one prompt's rewards whose gap exceeds `threshold`.

    random: shuffle, pair neighbours (each sample in at most one pair);
    max: the highest against the lowest reward;
    min: the closest pair whose gap still exceeds the threshold (hard but reliable comparisons).
    """
    n = len(rewards)
    if n < 2:
        return []
    if mode == "random":
        order = list(range(n))
        rng.shuffle(order)
        candidates = [(order[k], order[k + 1]) for k in range(0, n - 1, 2)]
    elif mode == "max":
        ranked = sorted(range(n), key=rewards.__getitem__)
        candidates = [(ranked[-1], ranked[0])]
    elif mode == "min":
        ranked = sorted(range(n), key=rewards.__getitem__)
        best, j = None, 0
        for i in range(n):  # two pointers: the first j above i whose gap exceeds the threshold
            j = max(j, i + 1)
            while j < n and rewards[ranked[j]] - rewards[ranked[i]] <= threshold:
                j += 1
            if j < n and (best is None or rewards[ranked[j]] - rewards[ranked[i]] < best[0]):
                best = (rewards[ranked[j]] - rewards[ranked[i]], ranked[j], ranked[i])
        candidates = [best[1:]] if best else []
    else:
        raise ValueError(f"unknown pair mode {mode!r}")
    return [(i, j) for i, j in candidates if abs(rewards[i] - rewards[j]) > threshold]


def plan_pairs(groups: dict, mode: str, threshold, seed: int) -> tuple:
    """The pairwise comparisons for all prompts: ([(key_A, key_B)], threshold used).

    groups maps prompt_id -> [(key, reward)] in input order. A 'median'/'mean' threshold is taken
    over the gaps of the pairs the mode forms before any threshold, so 'median' keeps about the
    better-separated half of them. A/B order is a coin flip from `seed`.
    """
    rng = random.Random(seed)
    candidates = {pid: pairs_for_prompt([r for _, r in g], mode, -math.inf, rng) for pid, g in groups.items()}
    gaps = [abs(g[i][1] - g[j][1]) for pid, g in groups.items() for i, j in candidates[pid]]
    value = resolve_threshold(threshold, gaps)
    planned = []
    for pid, group in groups.items():
        rewards = [r for _, r in group]
        if mode == "min":  # the closest pair depends on the threshold: choose again
            chosen = pairs_for_prompt(rewards, mode, value, rng)
        else:
            chosen = [(i, j) for i, j in candidates[pid] if abs(rewards[i] - rewards[j]) > value]
        for i, j in chosen:
            if rng.random() < 0.5:
                i, j = j, i
            planned.append((group[i][0], group[j][0]))
    return planned, value


# ---- writing ----------------------------------------------------------------------------------------
class FeedbackWriter:
    """Rows to an open file: a JSON array, or JSONL (one row a line)."""

    def __init__(self, f, jsonl: bool):
        self.f, self.jsonl = f, jsonl
        self.count = 0
        if not jsonl:
            f.write("[")

    def write(self, row: dict):
        if self.jsonl:
            self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            self.f.write(("\n" if self.count == 0 else ",\n") + json.dumps(row, ensure_ascii=False))
        self.count += 1

    def finish(self):
        if not self.jsonl:
            self.f.write("\n]\n")


@contextlib.contextmanager
def feedback_file(path: str):
    """A FeedbackWriter (JSONL when the path ends in .jsonl, in any case) that becomes `path` only
    if the block ends without an error. It writes a new file of its own under
    atomic.temp_path(path), never through a link left at that name (train/atomic.py), so it
    cannot overwrite another file."""
    with atomic.write_file(path, encoding="utf-8") as f:
        out = FeedbackWriter(f, path.lower().endswith(".jsonl"))
        yield out
        out.finish()
