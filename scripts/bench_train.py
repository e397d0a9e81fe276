"""One training run of this harness or of TRL's RewardTrainer, in a subprocess of its own.

scripts/benchmark.py runs these; each run is a fresh process, so neither trainer inherits the
other's allocator state, threads or imports. A run gets its whole setup as one JSON spec:
    python scripts/bench_train.py --child ours|trl --spec '{"train_file": ..., ...}'
and prints one line `RESULT {json}`: the training time measured around the optimizer steps only
(no model load, no tokenisation, no eval), the tokens it trained on, held-out accuracy when the
spec names a test file to score, and an fp32 matmul measured in the same process afterwards.

Spec keys: train_file, test_file (JSONL of {prompt, chosen, rejected}), n_test (pairs scored),
model (our config group: minilm | smollm2), model_path, chat (the tokenizer has a chat template),
trl_eos (TRL's eos_token; None: the tokenizer's), batch_size, max_length, max_prompt_length,
truncation, lr, warmup, seed, threads, mixed_precision ("no" | "bf16": autocast on both sides, fp32
weights; the matmul ceiling is then a bf16 matmul), trl_attn (TRL's attn_implementation; None: the
model's default), ours_extra (Hydra overrides), trl_extra (RewardConfig fields).
"""
import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory() -> bool:
    """Starts a new peak: this process's VmHWM (peak resident set) is set back to its current RSS
    (Linux: "5" to /proc/self/clear_refs), and on a GPU torch's peak allocation counter. False if
    the kernel refused, so the peak that follows covers the whole process life."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(was_reset: bool) -> dict:
    """The peak since reset_peak_memory(): resident memory of the whole process (weights, gradients,
    optimizer state, activations, and also the Python/torch runtime and the data already loaded;
    freed memory the allocator keeps counts until it is returned to the system),
    and torch's peak GPU allocation where there is a GPU. VmHWM, not ru_maxrss, which on Linux
    carries the parent's peak over fork + exec."""
    import torch
    out = {"peak_rss_since": "the first step" if was_reset else "process start"}
    try:
        with open("/proc/self/status") as f:
            out["train_peak_rss_mb"] = int(next(l for l in f if l.startswith("VmHWM")).split()[1]) / 1024
    except (OSError, StopIteration):
        out["train_peak_rss_mb"] = None
    if torch.cuda.is_available():
        out["train_peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


def non_embedding_params(model) -> int:
    """Parameters that every token goes through: the embeddings are lookups, and the pooler and
    the reward head run once per sequence, so none of them is in the 6 x N x tokens count."""
    per_sequence = ("embed", "pooler", "classifier", "score")
    return sum(p.numel() for name, p in model.named_parameters() if not any(k in name for k in per_sequence))


def compute_dtype(spec: dict):
    """The dtype the run's matmuls compute in: bf16 under mixed_precision bf16, else fp32."""
    import torch
    return torch.bfloat16 if spec.get("mixed_precision", "no") == "bf16" else torch.float32


def matmul_flops(size: int = 2048, repeats: int = 10, dtype=None) -> float:
    """matmul FLOP/s (fp32 unless `dtype`) in this process, with its thread count: the ceiling for
    training FLOP/s. The best of three timings, as a matmul that another process disturbed says
    little of the device."""
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(size, size, device=device, dtype=dtype or torch.float32) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b  # warm up the kernels
    best = float("inf")
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 * repeats / best


def during(probes: list):
    """The matmul FLOP/s that a run's steps ran under: the probes after them, weighted by step seconds."""
    seconds = sum(s for s, _ in probes)
    return sum(s * rate for s, rate in probes) / seconds if seconds else None


# ---- this harness -----------------------------------------------------------------------------
def ours(spec: dict, workdir: str) -> dict:
    from hydra import compose, initialize_config_dir

    from train.build import build
    from train.config import register

    bs, n_test = spec["batch_size"], spec["n_test"]
    os.environ["ACCELERATE_MIXED_PRECISION"] = spec.get("mixed_precision", "no")  # what accelerate launch sets
    dtype = compute_dtype(spec)
    register()
    overrides = [f"cache_dir={workdir}", "exp_name=bench", "datasets=[jsonl]",
                 f"++datasets.jsonl.path={spec['train_file']}", f"++datasets.jsonl.test_path={spec['test_file']}",
                 f"n_eval_examples={n_test}", f"eval_batch_size={max(bs, 8)}", f"model={spec['model']}",
                 f"model.name_or_path={spec['model_path']}", f"model.max_length={spec['max_length']}",
                 f"model.max_prompt_length={spec['max_prompt_length']}", f"model.truncation={spec['truncation']}",
                 f"batch_size={bs}", f"microbatch_size={bs}", "n_epochs=1", "do_first_eval=false",
                 "eval_every=1000000000", f"lr={spec['lr']}", f"warmup={spec['warmup']}", f"seed={spec['seed']}",
                 *spec.get("ours_extra", [])]
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=overrides)
    trainer = build(cfg)
    params = {"trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
              "total_params": sum(p.numel() for p in trainer.model.parameters())}  # counted before FINAL merges LoRA
    # The peak is read when the final eval starts (the only eval: do_first_eval=false and eval_every
    # beyond the run), so it covers the optimizer steps and not the eval or FINAL's save after them.
    memory, evaluate = {}, trainer.evaluate

    def evaluate_after_reading_the_peak(final=False):
        memory.update(peak_memory(was_reset))
        return evaluate(final=final)

    trainer.evaluate = evaluate_after_reading_the_peak
    # This machine's matmul speed drifts by a quarter from minute to minute (another tenant, the
    # clock), so one matmul timed after the run says little of the speed during each step. A short
    # matmul right after every step gives the ceiling the step ran under; it is not in train_seconds.
    probes, train_step = [], trainer.train_step

    def step_then_probe(batches):
        before = trainer.state.train_seconds
        out = train_step(batches)
        probes.append((trainer.state.train_seconds - before, matmul_flops(repeats=2, dtype=dtype)))
        return out

    trainer.train_step = step_then_probe
    was_reset = reset_peak_memory()
    trainer.train()
    trainer.cleanup()
    records = read_jsonl(os.path.join(workdir, "bench", "metrics.jsonl"))
    train = [r for r in records if r["split"] == "train"]
    seconds = train[-1]["train_seconds"]  # the optimizer steps with their data loading, no eval
    pairs = train[-1]["examples"]
    # After the first step, which holds any one-time cost (compile=true compiles in it).
    after_first = seconds - train[0]["train_seconds"]
    # Real tokens: the new `tokens` field when the harness writes it; before that, tokens_per_s
    # (the attention mask's ones) times each step's seconds (its pairs / pairs_per_s).
    if all("tokens" in r for r in train):
        tokens, source = sum(r["tokens"] for r in train), "metrics tokens"
    else:
        tokens = sum(r["tokens_per_s"] * bs / r["pairs_per_s"] for r in train)
        source = "tokens_per_s x step seconds"
    computed = sum(r["computed_tokens"] for r in train) if all("computed_tokens" in r for r in train) else None
    # What the forwards had to compute without padding: fewer than `tokens` when a decoder's
    # prompt is computed once per pair (share_prompt). FLOPs are counted from these.
    unique = sum(r["unique_tokens"] for r in train) if all("unique_tokens" in r for r in train) else tokens
    final = json.load(open(os.path.join(workdir, "bench", "FINAL", "metrics.json")))
    return {"trainer": "ours", "pairs": pairs, "steps": len(train), "seconds": seconds, "pairs_per_s": pairs / seconds,
            "pairs_per_s_after_first_step": (pairs - train[0]["examples"]) / after_first if len(train) > 1 else None,
            "seconds_after_first_step": after_first if len(train) > 1 else None,
            "unique_tokens_after_first_step": unique - train[0]["unique_tokens"]
            if len(train) > 1 and "unique_tokens" in train[0] else None,
            "tokens": tokens, "tokens_source": source, "computed_tokens": computed, "unique_tokens": unique,
            "tokens_per_s": tokens / seconds, "non_embedding_params": non_embedding_params(trainer.model),
            "accuracy": final["accuracy"], "n_test": final["n_pairs"], "mixed_precision": train[-1].get("mixed_precision"),
            "truncated_train": final.get("data_train_truncated"), "dropped_train": final.get("data_train_dropped", 0),
            "overrides": spec.get("ours_extra", []), **params, **memory, "matmul_flops": matmul_flops(dtype=dtype),
            "matmul_flops_during": during(probes), "matmul_flops_during_after_first_step": during(probes[1:]),
            "step_probes": probes,
            "peak_rss_mb": peak_rss_mb()}


# ---- TRL --------------------------------------------------------------------------------------
def trl_rows(rows: list, chat: bool) -> dict:
    """Our {prompt, chosen, rejected} rows as TRL's columns: conversational (message lists, TRL
    renders them with the chat template) when the tokenizer has one; else the prompt as the same
    text the harness renders for a tokenizer without a template, plus a newline, then the response
    (TRL appends its eos_token to the text itself)."""
    from train.data.formatting import prompt_as_text

    def turns(prompt):
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    if chat:
        return {"prompt": [turns(r["prompt"]) for r in rows],
                "chosen": [[{"role": "assistant", "content": r["chosen"]}] for r in rows],
                "rejected": [[{"role": "assistant", "content": r["rejected"]}] for r in rows]}
    return {"prompt": [prompt_as_text(r["prompt"]) + "\n" for r in rows],
            "chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows]}


def trl_ids(tokenizer, prompt, response, eos: str) -> list:
    """The token ids TRL's RewardTrainer trains on for one side of a pair (its _tokenize)."""
    from trl.data_utils import _tokenize
    if isinstance(prompt, list):
        return _tokenize(tokenizer, prompt + response)["input_ids"]
    return _tokenize(tokenizer, prompt + (response if response.endswith(eos) else response + eos))["input_ids"]


def trl_best_config(extra: dict) -> tuple:
    """(fields of `extra` that this TRL's RewardConfig has, names it lacks)."""
    from trl import RewardConfig
    known = {f.name for f in dataclasses.fields(RewardConfig)}
    return {k: v for k, v in extra.items() if k in known}, [k for k in extra if k not in known]


def trl(spec: dict, workdir: str) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    bs, length = spec["batch_size"], spec["max_length"]
    path, chat = spec["model_path"], spec["chat"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = spec.get("trl_eos") or tokenizer.eos_token
    rows = read_jsonl(spec["train_file"])
    columns = trl_rows(rows, chat)
    # A length column for train_sampling_strategy=group_by_length (else unused): the longer side.
    columns["length"] = [max(len(trl_ids(tokenizer, p, c, eos)), len(trl_ids(tokenizer, p, r, eos)))
                         for p, c, r in zip(columns["prompt"], columns["chosen"], columns["rejected"])]
    extra, missing = trl_best_config(spec.get("trl_extra", {}))
    torch.manual_seed(spec["seed"])
    attention = {"attn_implementation": spec["trl_attn"]} if spec.get("trl_attn") else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32, **attention)
    bf16 = compute_dtype(spec) == torch.bfloat16  # autocast over fp32 weights, as ours
    config = RewardConfig(output_dir=workdir, per_device_train_batch_size=bs, num_train_epochs=1,
                          learning_rate=spec["lr"], warmup_steps=spec["warmup"], max_length=length, seed=spec["seed"],
                          report_to=[], save_strategy="no", logging_steps=10**9, eos_token=spec.get("trl_eos"),
                          use_cpu=not torch.cuda.is_available(), disable_dropout=True, dataloader_num_workers=0,
                          bf16=bf16, fp16=False, gradient_checkpointing=False, **extra)

    class StepTimer(TrainerCallback):
        """Seconds from the start of the epoch to each step's end: the steps with their data
        loading, as the harness's train_seconds; no setup, no logging after the last step."""
        seconds = 0.0

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds += now - self.last
            self.last = now

    trainer = RewardTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_dict(columns),
                            processing_class=tokenizer, callbacks=[timer := StepTimer()])
    counts = {"tokens": 0, "computed_tokens": 0}
    collate = trainer.data_collator

    def counting_collator(examples):  # real (attention mask) and computed (padded) tokens
        batch = collate(examples)
        counts["tokens"] += int(batch["attention_mask"].sum())
        counts["computed_tokens"] += batch["attention_mask"].numel()
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    pairs = trainer.state.global_step * bs
    result = {"trainer": "trl", "pairs": pairs, "steps": trainer.state.global_step, "seconds": timer.seconds,
              "pairs_per_s": pairs / timer.seconds, **counts, "tokens_per_s": counts["tokens"] / timer.seconds,
              "non_embedding_params": non_embedding_params(model),
              "dropped_train": len(rows) - len(trainer.train_dataset),
              "config": extra, "config_missing": missing, "mixed_precision": trainer.accelerator.mixed_precision,
              "attn_implementation": model.config._attn_implementation}
    if spec.get("test_file"):
        result.update(trl_accuracy(model, tokenizer, spec, eos))
    return {**result, "matmul_flops": matmul_flops(dtype=compute_dtype(spec)), "peak_rss_mb": peak_rss_mb()}


def trl_accuracy(model, tokenizer, spec: dict, eos: str) -> dict:
    """Held-out accuracy of the TRL model. TRL drops pairs longer than max_length, so that both
    trainers are scored on the same pairs every test pair is scored here, as TRL builds its ids,
    cut to max_length. A tie counts as wrong (RewardBench)."""
    import torch
    rows = read_jsonl(spec["test_file"])[:spec["n_test"]]
    columns = trl_rows(rows, spec["chat"])
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    scores = {}
    with torch.inference_mode():
        for side in ("chosen", "rejected"):
            ids = [trl_ids(tokenizer, p, r, eos)[:spec["max_length"]] for p, r in zip(columns["prompt"], columns[side])]
            scores[side] = []
            for i in range(0, len(ids), 16):
                part = ids[i:i + 16]
                longest = max(map(len, part))
                input_ids = torch.tensor([s + [pad] * (longest - len(s)) for s in part], device=device)
                mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in part], device=device)
                scores[side] += model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()
    correct = sum(c > r for c, r in zip(scores["chosen"], scores["rejected"]))
    return {"accuracy": correct / len(rows), "n_test": len(rows)}


# ---- running a child --------------------------------------------------------------------------
def child_env(threads: int) -> dict:
    """The environment of every timed process: the same thread counts on both sides."""
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
                HF_DATASETS_DISABLE_PROGRESS_BARS="1")


def run_child(which: str, spec: dict, timeout: float = None) -> dict:
    """A fresh process runs one training; its RESULT, or {"error": the last line it wrote to stderr}."""
    argv = [sys.executable, __file__, "--child", which, "--spec", json.dumps(spec)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=child_env(spec["threads"]), cwd=ROOT,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"trainer": which, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"trainer": which, "error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def run_ours(spec: dict, timeout: float = None) -> dict:
    """run_child("ours"), and once more without spec["ours_extra"] if it failed with them: an
    option the config knows may still not support this model yet. The retry records why."""
    result = run_child("ours", spec, timeout)
    if "error" in result and spec.get("ours_extra"):
        first = result
        result = run_child("ours", dict(spec, ours_extra=[]), timeout)
        result["fallback_from"] = {"overrides": spec["ours_extra"], "error": first["error"]}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["ours", "trl"], required=True)
    parser.add_argument("--spec", required=True, help="the run's setup as JSON (see the module docstring)")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    import torch
    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as workdir:
        result = (ours if args.child == "ours" else trl)(spec, workdir)
    print("RESULT " + json.dumps({**result, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
