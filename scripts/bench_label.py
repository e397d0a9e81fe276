"""Labeling speed: python -m train.label end to end vs a bare batched forward, on real prompts.

Each prompt of the real data gets 4 samples to score: its own chosen and rejected responses and
those of another pair (real texts of real lengths; which responses they are does not change the
cost). Per repeat, interleaved:
(a) bare: the model's forward on the same samples, pre-tokenised and pre-padded, in the labeler's
    batches (its chunks, each sorted by length), no prefix sharing, no model load;
(b) train.label end to end (read, check, load the model, encode, score, write) with NO_SHARE_ARGV;
(c) the same with SHARE_ARGV: each prompt's tokens computed once for its 4 samples.
label_vs_bare_forward = (b)/(a) and label_prefix_sharing_speedup = (c)/(a), per repeat.
"""
import contextlib
import io
import json
import os
import time

# The labeler's prefix-sharing switch. Until train.label has it, (b) runs without a flag (which
# then means no sharing) and (c) records why it could not run.
SHARE_ARGV = ["--share_prompt", "on"]
NO_SHARE_ARGV = ["--share_prompt", "off"]
SAMPLES_PER_PROMPT = 4


def label_samples(pairs: list, n_prompts: int) -> list:
    """n_prompts prompts x 4 samples: pair i's two responses and pair i + n_prompts's two."""
    if 2 * n_prompts > len(pairs):
        raise ValueError(f"{n_prompts} prompts need {2 * n_prompts} pairs; the data has {len(pairs)}")
    rows = []
    for i in range(n_prompts):
        own, other = pairs[i], pairs[i + n_prompts]
        outputs = [own["chosen"], own["rejected"], other["chosen"], other["rejected"]]
        rows += [{"prompt_id": i, "sample_id": k, "prompt": own["prompt"], "output": text}
                 for k, text in enumerate(outputs)]
    return rows


def rejection(parse_args, argv: list):
    """None if the labeler's parser takes argv, else its error line."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parse_args(argv)
    except SystemExit:
        return (stderr.getvalue().strip().splitlines() or ["rejected"])[-1]
    return None


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(model_path: str, max_length: int, rows: list, batch_size: int, repeat: int, workdir: str) -> dict:
    """{"runs": [{bare, label, label_shared samples/s}], "share_error": ..., "no_share_argv": ...}."""
    import torch

    from train import label
    from train.labeling.scoring import CHUNK_BATCHES, Scorer, load_reward_model
    from train.model_files import settings

    samples = os.path.join(workdir, "label-samples.jsonl")
    with open(samples, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    n = len(rows)
    base = ["--reward_model_path", model_path, "--batch_size", str(batch_size), "--max_length", str(max_length)]
    no_share = [] if rejection(label.parse_args, base + [samples, "x"] + NO_SHARE_ARGV) else NO_SHARE_ARGV
    share_error = rejection(label.parse_args, base + [samples, "x"] + SHARE_ARGV)

    # (a)'s inputs, prepared untimed, as the labeler prepares them.
    setup = settings(model_path, label.parse_args(base + [samples, "x"]))
    model, tokenizer = load_reward_model(model_path, setup)
    scorer = Scorer(model, tokenizer, setup["max_length"], setup["max_prompt_length"], setup["truncation"], batch_size)
    encoded = [scorer.encode(r["prompt"], r["output"]) for r in rows]
    batches, chunk = [], batch_size * CHUNK_BATCHES
    for first in range(0, n, chunk):
        part = encoded[first:first + chunk]
        batches += [scorer.collate([part[i] for i in idx]) for idx in scorer.batches(part)]

    @torch.inference_mode()
    def bare():
        for batch in batches:
            model(**batch)

    def labeled(extra: list, k: int):
        out = os.path.join(workdir, f"label-out-{k}.jsonl")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            label.label(label.parse_args(base + [samples, out] + extra))

    bare()  # warm-up, and (a) after it pays no one-off import of the model's modules
    measures = [("bare", bare), ("label", lambda: labeled(no_share, k))]
    if share_error is None:
        measures.append(("label_shared", lambda: labeled(SHARE_ARGV, k)))
    runs = []
    for k in range(repeat):
        run_ = {}
        for name, fn in measures if k % 2 == 0 else measures[::-1]:  # alternate the order per repeat
            try:
                run_[f"{name}_samples_per_s"] = n / seconds(fn)
            except Exception as err:  # a labeler that fails is a figure that could not be taken
                run_[f"{name}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        runs.append(run_)
    tokens = sum(len(e["input_ids"]) for e in encoded)
    return {"samples": n, "prompts": n // SAMPLES_PER_PROMPT, "tokens": tokens, "batch_size": batch_size,
            "max_length": setup["max_length"], "no_share_argv": no_share, "share_argv": SHARE_ARGV,
            "share_error": share_error, "runs": runs}
