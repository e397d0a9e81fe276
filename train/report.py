"""The preference-eval report: metrics over scored pairs, a printed table, a JSON file and two PNGs.

Shared by `python -m train.evaluate` and training's final eval (FINAL/eval_report.json), so both
compute the same numbers the same way. A pair is a dict
    {"chosen": s_c, "rejected": s_r, "source": str, "subset": str, "chosen_len": int, "rejected_len": int}
(other keys are ignored). Definitions:

- accuracy: the share of pairs with s_c > s_r. A tie (s_c == s_r) counts as wrong (RewardBench).
- margin: the mean of s_c - s_r.
- calibration of P(chosen > rejected) = sigmoid(s_c - s_r), read as a classifier's confidence: the
  predicted winner is the response with the higher reward, its probability is
  conf = sigmoid(|s_c - s_r|), in [0.5, 1], and the prediction is right when it is the chosen one (a
  tie: conf 0.5, wrong). ECE = sum over 10 equal-width bins of conf over [0.5, 1] (each 0.05 wide,
  [lo, hi), the last one closed) of (pairs in bin / pairs) * |accuracy in bin - mean conf in bin|.
  Brier = mean of (sigmoid(s_c - s_r) - 1)^2, the squared error of the probability given to the
  labelled outcome (the same number as the mean of (conf - right)^2).
- length bias: response length in tokens as the model saw it (after truncation) is the length of
  each sequence after the prefix that the pair's two sequences share (prompt, template and any
  opening the two responses have in common; see response_lengths). Spearman's rank correlation of
  reward with that length over all 2N responses (average ranks for ties; null if either is constant),
  and accuracy over the pairs whose chosen response is longer, shorter, or of equal length.
"""
import json
import math
import os

import numpy as np

from train import atomic

ECE_BINS = 10  # equal-width bins of the predicted winner's probability over [0.5, 1]
REPORT_NAME = "eval_report"  # FINAL/eval_report.json; its PNGs are FINAL/reliability.png, reward_hist.png
LENGTH_BUCKETS = ("chosen_longer", "chosen_shorter", "equal_length")


def response_lengths(chosen_ids, rejected_ids) -> tuple:
    """(chosen, rejected) response lengths in tokens: each sequence's length after the longest prefix
    the two share. Chosen and rejected share their prompt and template, so for an untruncated pair
    this is the response plus its closing special tokens, less any opening the two responses have
    in common; chosen - rejected is exactly the difference of the sequences' lengths."""
    shared = 0
    for a, b in zip(chosen_ids, rejected_ids):
        if a != b:
            break
        shared += 1
    return len(chosen_ids) - shared, len(rejected_ids) - shared


def average_ranks(values) -> np.ndarray:
    """Ranks from 1, tied values sharing the mean of their ranks (as scipy.stats.rankdata)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(x, y):
    """Spearman's rank correlation (Pearson's r of the average ranks); None when it is undefined
    (fewer than 2 values, or either side constant)."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    if denominator == 0:
        return None
    return float((rx * ry).sum() / denominator)


def sigmoid(d) -> np.ndarray:
    """1 / (1 + exp(-d)) without overflow for large |d|."""
    d = np.asarray(d, dtype=np.float64)
    e = np.exp(-np.abs(d))
    return np.where(d >= 0, 1 / (1 + e), e / (1 + e))


def calibration(chosen, rejected, n_bins: int = ECE_BINS) -> dict:
    """ECE (of the predicted winner's probability, n_bins equal-width bins over [0.5, 1]), Brier
    score, and the bins themselves for the reliability diagram. Ties are predictions of 0.5, wrong."""
    d = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    d = np.where(np.isnan(d), 0.0, d)  # a NaN score ranks nothing: a tie, as it is for accuracy
    p = sigmoid(d)
    conf = sigmoid(np.abs(d))
    right = (d > 0).astype(np.float64)
    width = 0.5 / n_bins
    index = np.clip(np.floor((conf - 0.5) / width), 0, n_bins - 1).astype(int)
    bins, ece = [], 0.0
    for b in range(n_bins):
        inside = index == b
        count = int(inside.sum())
        entry = {"lo": 0.5 + b * width, "hi": 0.5 + (b + 1) * width, "n": count,
                 "mean_confidence": None, "accuracy": None}
        if count:
            entry["mean_confidence"] = float(conf[inside].mean())
            entry["accuracy"] = float(right[inside].mean())
            ece += count / len(d) * abs(entry["accuracy"] - entry["mean_confidence"])
        bins.append(entry)
    return {"ece": float(ece), "brier": float(((p - 1) ** 2).mean()), "n_bins": n_bins,
            "binning": f"{n_bins} equal-width bins of sigmoid(|s_c - s_r|) over [0.5, 1]; a tie is 0.5 and wrong",
            "bins": bins}


def _group(chosen: np.ndarray, rejected: np.ndarray) -> dict:
    return {"n": int(len(chosen)), "accuracy": float((chosen > rejected).mean()),
            "margin": float((chosen - rejected).mean()), "ties": int((chosen == rejected).sum())}


def length_bucket(chosen_len: int, rejected_len: int) -> str:
    if chosen_len > rejected_len:
        return "chosen_longer"
    return "chosen_shorter" if chosen_len < rejected_len else "equal_length"


def preference_report(pairs: list) -> dict:
    """Every metric of the module docstring over `pairs` (at least one). Pure: no I/O."""
    if not pairs:
        raise ValueError("preference_report needs at least one pair")
    chosen = np.array([p["chosen"] for p in pairs], dtype=np.float64)
    rejected = np.array([p["rejected"] for p in pairs], dtype=np.float64)
    rewards = np.concatenate([chosen, rejected])
    report = {
        "n_pairs": len(pairs),
        **{k: v for k, v in _group(chosen, rejected).items() if k != "n"},
        "chosen_mean": float(chosen.mean()), "rejected_mean": float(rejected.mean()),
        "reward_min": float(rewards.min()), "reward_mean": float(rewards.mean()), "reward_max": float(rewards.max()),
    }
    calib = calibration(chosen, rejected)
    report.update(ece=calib["ece"], brier=calib["brier"])
    for field in ("source", "subset"):
        names = [str(p.get(field, "")) for p in pairs]
        report[f"by_{field}"] = {
            name: _group(chosen[keep], rejected[keep])
            for name in sorted(set(names)) for keep in [np.array([n == name for n in names])]}
    c_len = np.array([p["chosen_len"] for p in pairs], dtype=np.float64)
    r_len = np.array([p["rejected_len"] for p in pairs], dtype=np.float64)
    buckets = np.array([length_bucket(c, r) for c, r in zip(c_len, r_len)])
    report["length"] = {
        "unit": "tokens after the prefix the pair's two sequences share (after truncation)",
        "spearman_reward_length": spearman(rewards, np.concatenate([c_len, r_len])),
        "chosen_len_mean": float(c_len.mean()), "rejected_len_mean": float(r_len.mean()),
        **{name: _group(chosen[buckets == name], rejected[buckets == name]) if (buckets == name).any()
           else {"n": 0, "accuracy": None, "margin": None, "ties": 0} for name in LENGTH_BUCKETS},
    }
    report["calibration"] = calib
    return report


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(report: dict) -> str:
    """The report as a plain-text table for the terminal."""
    rows = [("all", report["n_pairs"], report["accuracy"], report["margin"])]
    for field in ("source", "subset"):
        rows += [(f"{field}={name}", g["n"], g["accuracy"], g["margin"]) for name, g in report[f"by_{field}"].items()]
    length = report["length"]
    rows += [(name, length[name]["n"], length[name]["accuracy"], length[name]["margin"]) for name in LENGTH_BUCKETS]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'pairs':<{width}}  {'n':>6}  {'accuracy':>8}  {'margin':>8}"]
    lines += [f"{name:<{width}}  {n:>6}  {_fmt(acc):>8}  {_fmt(margin):>8}" for name, n, acc, margin in rows]
    lines.append(f"ties {report['ties']}  ECE {_fmt(report['ece'])}  Brier {_fmt(report['brier'])}  "
                 f"Spearman(reward, length) {_fmt(length['spearman_reward_length'])}  "
                 f"rewards [{_fmt(report['reward_min'])}, {_fmt(report['reward_max'])}]")
    return "\n".join(lines)


def png_paths(json_path: str) -> dict:
    """The PNGs beside a report: reliability.png and reward_hist.png next to eval_report.json, else
    prefixed with the JSON's stem (foo.json -> foo_reliability.png), so several reports can share a dir."""
    folder, stem = os.path.split(json_path)
    stem = os.path.splitext(stem)[0]
    prefix = "" if stem == REPORT_NAME else f"{stem}_"
    return {name: os.path.join(folder, f"{prefix}{name}.png") for name in ("reliability", "reward_hist")}


def write_report(json_path: str, report: dict, pairs: list):
    """The PNGs (plot_reliability, plot_reward_hist), then the JSON, each written atomically; the
    JSON comes last, so its presence means the report is complete."""
    paths = png_paths(json_path)
    plot_reliability(report["calibration"], paths["reliability"])
    plot_reward_hist(pairs, paths["reward_hist"])
    atomic.write_text(json_path, json.dumps(report, indent=1) + "\n")


def _save(fig, path: str):
    import matplotlib.pyplot as plt
    with atomic.write_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    return plt


def plot_reliability(calib: dict, path: str):
    """Reliability diagram: accuracy per confidence bin against the diagonal, with bin counts."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    bins = calib["bins"]
    width = bins[0]["hi"] - bins[0]["lo"]
    filled = [b for b in bins if b["n"]]
    ax.bar([b["lo"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.plot([b["mean_confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="tab:red",
            label="(mean confidence, accuracy)")
    for b in filled:
        ax.annotate(str(b["n"]), (b["lo"] + width / 2, b["accuracy"]), ha="center", va="bottom", fontsize=7)
    ax.plot([0.5, 1], [0.5, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0.5, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("predicted winner's probability sigmoid(|s_c - s_r|)")
    ax.set_ylabel("share where the predicted winner is chosen")
    ax.set_title(f"ECE {calib['ece']:.3f}, Brier {calib['brier']:.3f} (pairs per bin above the bars)", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_reward_hist(pairs: list, path: str):
    """Histograms of chosen and rejected rewards over the same bins."""
    plt = _pyplot()
    chosen = np.array([p["chosen"] for p in pairs], dtype=np.float64)
    rejected = np.array([p["rejected"] for p in pairs], dtype=np.float64)
    chosen, rejected = chosen[np.isfinite(chosen)], rejected[np.isfinite(rejected)]
    fig, ax = plt.subplots(figsize=(6, 4))
    both = np.concatenate([chosen, rejected])
    if len(both):
        lo, hi = float(both.min()), float(both.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1, min(40, max(5, len(both) // 4)) + 1)
        ax.hist(chosen, bins=edges, alpha=0.6, label=f"chosen (mean {chosen.mean():.3f})" if len(chosen) else "chosen")
        ax.hist(rejected, bins=edges, alpha=0.6,
                label=f"rejected (mean {rejected.mean():.3f})" if len(rejected) else "rejected")
        ax.legend()
    ax.set_xlabel("reward")
    ax.set_ylabel("responses")
    ax.set_title(f"{len(pairs)} pairs", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
