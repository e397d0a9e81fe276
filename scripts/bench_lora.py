"""The `lora` section of scripts/benchmark.py: LoRA (model.peft.enabled=true) vs full fine-tuning
of the same model, side by side in one run.

Both train on the same real pairs (those that fit max_length untruncated), with the same batch,
max_length, lr (--lr: LoRA usually wants a higher one, but speed and memory do not depend on it),
options (--ours_options) and thread count, each run in a fresh process (scripts/bench_train.py),
interleaved with the order alternating per repeat. Per run it records:
- trainable and total parameters, counted on the built model before training;
- pairs/s over the optimizer steps (data loading included, no model load, no eval), as the
  speed section measures them;
- peak memory: the training process's peak resident set (VmHWM) from just before the first
  optimizer step to the end of the last (the final eval and FINAL's save are left out), which
  holds the weights, gradients, AdamW's two moments and activations, and also the Python/torch
  runtime and the tokenised data, in both variants alike. On a GPU, torch's peak allocation as
  well. Read the ratio LoRA / full, not the megabytes alone.
Held-out accuracy is not compared here: a few dozen pairs say nothing about it.
"""
import os
import statistics

from scripts.bench_quality import fitting_pairs, held_out_split, write_jsonl
from scripts.bench_train import run_child

VARIANTS = ("full", "lora")


def median(values: list):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run(args, base: dict, pairs: list, tokenizer, max_length: int, workdir: str, ours_options: list,
        say=print) -> dict:
    """The interleaved runs and the figures from them (see the module docstring)."""
    want = args.lora_pairs // args.batch_size * args.batch_size  # whole batches: the harness drops the rest
    train_part, test_part = held_out_split(pairs, min(8, len(pairs) // 2))
    chosen, stats = fitting_pairs(train_part, want, tokenizer, max_length, base["trl_eos"])
    chosen = chosen[:len(chosen) // args.batch_size * args.batch_size]
    if not chosen:
        raise RuntimeError(f"no {args.batch_size} pairs of the real data fit max_length={max_length}")
    spec = dict(base, max_prompt_length=max_length, truncation="keep_start", n_test=8,
                train_file=write_jsonl(os.path.join(workdir, "lora-train.jsonl"), chosen),
                test_file=write_jsonl(os.path.join(workdir, "lora-test.jsonl"), test_part[:8]))
    extra = {"full": ours_options, "lora": ours_options + args.lora_options}
    runs = []
    for k in range(args.repeat):
        order = VARIANTS if k % 2 == 0 else VARIANTS[::-1]
        result = {}
        for which in order:
            say(f"  {base['model']}: lora repeat {k + 1}/{args.repeat}, {which}")
            result[which] = run_child("ours", dict(spec, ours_extra=extra[which]), args.timeout)
        runs.append(result)

    def each(key: str, which: str) -> list:
        return [r[which].get(key) for r in runs]

    def ratios(key: str) -> list:
        return [r["lora"][key] / r["full"][key] if r["lora"].get(key) and r["full"].get(key) else None for r in runs]

    errors = [r[w]["error"] for r in runs for w in VARIANTS if "error" in r[w]]
    out = {"setup": {"pairs": len(chosen), "max_length": max_length, "batch_size": args.batch_size, "lr": args.lr,
                     "options": extra, **{k: stats[k] for k in ("examined", "too_long", "ours_tokens")}},
           "trainable_params": {w: median(each("trainable_params", w)) for w in VARIANTS},
           "total_params": {w: median(each("total_params", w)) for w in VARIANTS},
           "pairs_per_s": {w: median(each("pairs_per_s", w)) for w in VARIANTS},
           "train_peak_rss_mb": {w: median(each("train_peak_rss_mb", w)) for w in VARIANTS},
           "peak_rss_since": next((r[w]["peak_rss_since"] for r in runs for w in VARIANTS if "peak_rss_since" in r[w]),
                                  None),
           "runs": runs}
    if any("train_peak_cuda_allocated_mb" in r[w] for r in runs for w in VARIANTS):
        out["train_peak_cuda_allocated_mb"] = {w: median(each("train_peak_cuda_allocated_mb", w)) for w in VARIANTS}
    for key, name in (("pairs_per_s", "lora_speed_vs_full"), ("train_peak_rss_mb", "lora_peak_rss_vs_full")):
        values = [v for v in ratios(key) if v is not None]
        out[name] = {"min": min(values) if values else None, "median": median(values), "values": ratios(key)}
    if errors:
        out["error"] = errors[0]
    return out


def table_rows(model: str, block: dict) -> list:
    """Markdown rows for benchmark.py's table: | model | figure | min | median | target | notes |."""
    def cell(value, digits=2):
        return "—" if value is None else f"{value:.{digits}f}"

    if "lora_speed_vs_full" not in block:
        return [f"| {model} | lora_vs_full | | | | {block.get('error', 'not measured')} |"]
    p, mem, n = block["pairs_per_s"], block["train_peak_rss_mb"], block["trainable_params"]
    speed, peak = block["lora_speed_vs_full"], block["lora_peak_rss_vs_full"]
    share = n["lora"] / n["full"] * 100 if n["lora"] and n["full"] else None
    return [
        f"| {model} | lora_trainable_params | | | | LoRA {n['lora'] or 0:,} ({cell(share)}% of the full "
        f"{n['full'] or 0:,}: adapters + head) |",
        f"| {model} | lora_speed_vs_full | {cell(speed['min'])} | {cell(speed['median'])} | none | "
        f"LoRA {cell(p['lora'], 3)} vs full {cell(p['full'], 3)} pairs/s (medians) |",
        f"| {model} | lora_peak_rss_vs_full | {cell(peak['min'])} | {cell(peak['median'])} | none | "
        f"LoRA {cell(mem['lora'], 0)} vs full {cell(mem['full'], 0)} MB: peak RSS of the training process over "
        f"the optimizer steps, from {block['peak_rss_since']} (medians) |",
    ]
