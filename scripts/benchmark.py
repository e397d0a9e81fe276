"""Speed benchmark on real data: this harness vs TRL's RewardTrainer, and labeling vs a bare forward.

    python scripts/benchmark.py --out bench.json                     # everything, both models
    python scripts/benchmark.py --models minilm --only speed --repeat 1 --speed_pairs 32
    python scripts/benchmark.py --real_data ../shared/data/hh-rlhf-harmless/harmless-base-test.jsonl.gz
    python scripts/benchmark.py --mixed_precision bf16 --only speed   # both trainers in bf16 autocast

For each model (minilm: the bundled encoder; smollm2: a decoder, model=smollm2) it measures, side
by side in one run, on pairs of the real file (--real_data):
  train_speedup_vs_trl      pairs/s of this harness / TRL's RewardTrainer in its best CPU setting (fp32,
                            dropout off, no gradient checkpointing, group_by_length), the same pairs (those
                            that fit max_length for both, so neither cuts nor drops any), batch and max_length;
                            each side's held-out accuracy (trained on a real split) beside it
  padding_waste             token positions computed / real tokens, this harness, on the speed pairs
  hardware_efficiency       (6 x per-token params x real tokens + 12 x layers x width x sum of squared
                            lengths) / train seconds, / an fp32 matmul's FLOP/s in the same process, timed
                            right after every step (the machine's speed drifts) and weighted by step seconds
  hardware_efficiency_compiled  (--compile) the same for compile=true over the steps after the first (which
                            compiles), the attention term prorated by tokens; runs[].eager_after_first_step
                            is eager's over the same steps, for comparison
  label_vs_bare_forward     python -m train.label end to end / a bare batched forward without prefix sharing
  label_prefix_sharing_speedup  the labeler with prefix sharing, 4 samples per prompt / the same bare forward
  lora_*                    (section lora) LoRA vs full fine-tuning of the same model: trainable parameters,
                            pairs/s and the training process's peak resident memory, side by side
                            (scripts/bench_lora.py says what the peak covers); no target, informational
Every figure is the min and the median over --repeat repeats; the trainers run interleaved (the
order alternates per repeat), each run in a fresh process with the same thread counts. The
targets are printed beside the figures, never asserted. --out writes every repeat's raw numbers.
Timings are noisy on a busy or small machine: see "machine" in the JSON.
--mixed_precision bf16 trains both sides under bf16 autocast over fp32 weights (ours through
accelerate's mixed_precision, TRL with bf16=True) in the speed, accuracy and lora sections, and the
efficiency's ceiling is then a bf16 matmul; labeling stays fp32.
"""
import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Our fastest training options, tried first; any this checkout's config does not know yet is left
# out and listed in the JSON (setup.ours_options_missing).
OURS_FAST = ["length_grouping=true", "packing=true", "share_prompt=true"]
OURS_COMPILE = ["compile=true"]  # --compile: one more measured variant of ours
# TRL's best CPU setting beyond fp32, no dropout and no gradient checkpointing (always set):
# batches of similar lengths. remove_unused_columns=False keeps the length column for the sampler;
# TRL's collator reads only the token ids, so the other columns cost nothing but their reading.
TRL_BEST = {"train_sampling_strategy": "group_by_length", "remove_unused_columns": False}
# (comparison, value) per figure: printed beside it, never asserted.
TARGETS = {"train_speedup_vs_trl": (">=", 2.0), "train_speedup_compiled_vs_trl": (">=", 2.0),
           "compile_speedup_after_first_step": (">", 1.0),
           "padding_waste": ("<=", 1.05), "hardware_efficiency": (">=", 0.6),
           "hardware_efficiency_compiled": (">=", 0.6),
           "label_vs_bare_forward": (">=", 0.9), "label_prefix_sharing_speedup": (">=", 1.5),
           "fsdp_memory_vs_ddp": ("about", 0.5)}
MODELS = ("minilm", "smollm2")
SECTIONS = ("speed", "accuracy", "label", "lora", "sharding")
ALIASES = {"train": "speed", "quality": "accuracy"}  # the section names of the earlier benchmark


def machine(threads: int) -> dict:
    import torch
    import transformers
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    ram = None
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/meminfo") as f:
            ram = round(int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20, 1)
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "logical_cpus": os.cpu_count(), "ram_gib": ram, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl_version, "threads": threads, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def figure(name: str, values: list, runs: list, **extra) -> dict:
    """min and median of the values that were measured, with the raw runs and the target."""
    got = [v for v in values if v is not None]
    sign, target = TARGETS[name]
    out = {"min": min(got) if got else None, "median": statistics.median(got) if got else None,
           "target": f"{sign} {target}", "runs": runs, **extra}
    if not got:
        errors = [e for r in runs for e in _errors(r)]
        out["error"] = errors[0] if errors else "not measured"
    return out


def _errors(run) -> list:
    if not isinstance(run, dict):
        return []
    # A run that failed and was redone without our fast options (fallback_from) is not an error.
    return [v for k, v in run.items() if k.endswith("error") and v] + [
        e for k, v in run.items() if k != "fallback_from" for e in _errors(v)]


def ratio(a, b):
    return a / b if a is not None and b else None


# ---- per model ---------------------------------------------------------------------------------
def model_path(name: str, cache_dir: str) -> str:
    """The model dir our config group names; a GGUF is converted once under cache_dir/converted."""
    from hydra import compose, initialize_config_dir

    from train.config import register
    from train.models import convert_gguf

    register()
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=[f"model={name}"])
    path = cfg.model.name_or_path  # resolving ${pkg:...} raises if the package is missing
    if str(path).endswith(".gguf"):
        with contextlib.redirect_stderr(io.StringIO()):  # the conversion's progress bars
            path = convert_gguf(path, os.path.join(cache_dir, "converted"))
    return str(path)


def accepted(overrides: list) -> tuple:
    """(overrides this checkout's config takes, {override: why not} for the others)."""
    from train.config import check_overrides
    from train.errors import UserError
    ok, missing = [], {}
    for override in overrides:
        try:
            check_overrides([override])
            ok.append(override)
        except UserError as err:
            missing[override] = str(err)
    return ok, missing


def sizes(name: str, args) -> dict:
    if name == "minilm":
        return {"speed_pairs": args.speed_pairs, "max_length": args.max_length, "test_pairs": args.test_pairs,
                "accuracy_train_pairs": args.accuracy_train_pairs, "label_prompts": args.label_prompts}
    return {"speed_pairs": args.decoder_pairs, "max_length": args.decoder_max_length,
            "test_pairs": args.decoder_test_pairs, "accuracy_train_pairs": args.decoder_accuracy_train_pairs,
            "label_prompts": args.decoder_label_prompts}


def speed(args, base: dict, pairs: list, tokenizer, size: dict, workdir: str, has_trl: bool) -> dict:
    """The interleaved speed runs on the pairs that fit both trainers, and the figures from them."""
    from transformers import AutoConfig

    from scripts.bench_quality import fitting_pairs, held_out_split, write_jsonl
    from scripts.bench_train import run_child, run_ours

    # Whole batches only: the harness drops an incomplete last batch, TRL would train on it.
    want = size["speed_pairs"] // args.batch_size * args.batch_size
    train_part, test_part = held_out_split(pairs, min(size["test_pairs"], len(pairs) // 2))
    chosen, stats = fitting_pairs(train_part, want, tokenizer, size["max_length"], base["trl_eos"])
    chosen = chosen[:len(chosen) // args.batch_size * args.batch_size]
    spec = dict(base, max_prompt_length=size["max_length"], truncation="keep_start", n_test=8,
                train_file=write_jsonl(os.path.join(workdir, "speed-train.jsonl"), chosen),
                test_file=write_jsonl(os.path.join(workdir, "speed-test.jsonl"), test_part[:8]))
    fast, fast_missing = accepted(args.ours_options)
    variants = {"ours": dict(spec, ours_extra=fast)}
    compile_missing = {}
    if args.compile:
        compiled, compile_missing = accepted(OURS_COMPILE)
        if compiled:
            variants["ours_compile"] = dict(spec, ours_extra=fast + compiled)
    if has_trl:
        variants["trl"] = dict(spec, trl_extra=TRL_BEST)
    runs = []
    for k in range(args.repeat):
        order = list(variants) if k % 2 == 0 else list(variants)[::-1]  # alternate who goes first
        run = {}
        for which in order:
            say(f"  {base['model']}: speed repeat {k + 1}/{args.repeat}, {which}")
            if which == "ours":
                run[which] = run_ours(variants[which], args.timeout)
            else:
                run[which] = run_child("trl" if which == "trl" else "ours", variants[which], args.timeout)
        runs.append(run)

    config = AutoConfig.from_pretrained(base["model_path"])
    attention_per_sq = 12 * config.num_hidden_layers * config.hidden_size  # QK^T and AV, forward + backward

    def run_flops(r: dict, unique: int) -> tuple:
        """(6N, 6N + attention) FLOPs of `unique` of the run's real tokens computed; the attention
        term, known for the whole run, is prorated by tokens."""
        model_flops = 6 * r["non_embedding_params"] * unique
        return model_flops, model_flops + attention_per_sq * stats["ours_sum_sq"] * unique / r["unique_tokens"]

    def efficiency(r: dict):
        if "error" in r:
            return None
        model_flops, flops = run_flops(r, r["unique_tokens"])
        r["achieved_flops_6n"] = model_flops / r["seconds"]
        r["achieved_flops"] = flops / r["seconds"]
        return r["achieved_flops"] / r["matmul_flops_during"]

    def steady_efficiency(r: dict):
        """efficiency() over the steps after the first: a compiled model's speed once compiled."""
        if "error" in r or not r.get("seconds_after_first_step") or not r.get("unique_tokens_after_first_step"):
            return None
        _, flops = run_flops(r, r["unique_tokens_after_first_step"])
        return flops / r["seconds_after_first_step"] / r["matmul_flops_during_after_first_step"]

    def waste(r: dict):
        if "error" in r or r.get("computed_tokens") is None:
            return None
        return r["computed_tokens"] / r.get("unique_tokens", r["tokens"])  # padding only: prompt sharing is not waste

    ours_runs = [run["ours"] for run in runs]
    out = {"speed_setup": {"pairs_used": len(chosen), "pairs_wanted": want, **stats, "batch_size": args.batch_size,
                           "max_length": size["max_length"], "ours_options": fast,
                           "ours_options_missing": fast_missing, "compile_missing": compile_missing,
                           "trl_options": TRL_BEST if has_trl else None}}
    if has_trl:
        for which, key in (("ours", "train_speedup_vs_trl"), ("ours_compile", "train_speedup_compiled_vs_trl")):
            if which in variants:
                values = [ratio(run[which].get("pairs_per_s"), run["trl"].get("pairs_per_s")) for run in runs]
                out[key] = figure(key, values, runs if which == "ours" else [
                    {which: run[which], "trl": run["trl"]} for run in runs])
    else:
        out["train_speedup_vs_trl"] = {"error": "TRL is not installed: pip install -e '.[bench]'", "runs": runs}
    if "ours_compile" in variants:  # per step once compiled: the first step, which compiles, left out
        values = [ratio(run["ours_compile"].get("pairs_per_s_after_first_step"),
                        run["ours"].get("pairs_per_s_after_first_step")) for run in runs]
        out["compile_speedup_after_first_step"] = figure(
            "compile_speedup_after_first_step", values, [{w: run[w] for w in ("ours", "ours_compile")} for run in runs],
            note="compile=true vs eager, pairs/s over the steps after the first")
        out["hardware_efficiency_compiled"] = figure(
            "hardware_efficiency_compiled", [steady_efficiency(run["ours_compile"]) for run in runs],
            [{"achieved_over_matmul": steady_efficiency(run["ours_compile"]),
              "eager_after_first_step": steady_efficiency(run["ours"]),
              **{k: run["ours_compile"].get(k) for k in ("seconds_after_first_step", "unique_tokens_after_first_step",
                                                         "matmul_flops_during_after_first_step", "error")
                 if k in run["ours_compile"]}}
             for run in runs])
    if args.compile and "ours_compile" not in variants:
        out["train_speedup_compiled_vs_trl"] = {"error": f"compile not supported: {compile_missing}"}
    trl_waste = [waste(run["trl"]) for run in runs if "trl" in run]
    out["padding_waste"] = figure("padding_waste", [waste(r) for r in ours_runs], [
        {k: r.get(k) for k in ("tokens", "unique_tokens", "computed_tokens", "tokens_source", "error") if k in r}
        for r in ours_runs],
        trl_median=statistics.median([w for w in trl_waste if w] or [None]))  # TRL's, for comparison
    if not any("error" in r for r in ours_runs) and all(r.get("computed_tokens") is None for r in ours_runs):
        out["padding_waste"]["error"] = "not logged: the harness's metrics have no computed_tokens yet"
    out["hardware_efficiency"] = figure("hardware_efficiency", [efficiency(r) for r in ours_runs], [
        {k: r.get(k) for k in ("achieved_flops", "achieved_flops_6n", "matmul_flops", "matmul_flops_during",
                               "step_probes", "tokens", "seconds", "mixed_precision",
                               "non_embedding_params", "error") if k in r} for r in ours_runs],
        attention_flops_per_squared_length=attention_per_sq, sum_squared_lengths=stats["ours_sum_sq"])
    return out


def model_block(name: str, args, pairs: list, workdir: str) -> dict:
    import importlib.util

    from scripts import bench_label, bench_lora
    from scripts.bench_quality import accuracy, held_out_split
    from train.data.formatting import uses_chat_template
    from train.models import load_tokenizer

    path = model_path(name, args.cache_dir)
    size = sizes(name, args)
    tokenizer = load_tokenizer(path)
    chat = uses_chat_template(tokenizer)
    # TRL appends its eos_token to a plain-text pair; BERT has none, its [SEP] ends a sequence.
    trl_eos = None if chat else tokenizer.eos_token or tokenizer.sep_token
    base = {"model": name, "model_path": path, "chat": chat, "trl_eos": trl_eos, "batch_size": args.batch_size,
            "max_length": size["max_length"], "lr": args.lr, "warmup": args.warmup, "seed": 0,
            "threads": args.threads, "mixed_precision": args.mixed_precision, "trl_attn": args.trl_attn}
    has_trl = importlib.util.find_spec("trl") is not None
    block = {"model_path": path, "sizes": size}
    sections = args.only or SECTIONS
    if "speed" in sections:
        with section(block, "train_speedup_vs_trl"):
            block.update(speed(args, base, pairs, tokenizer, size, workdir, has_trl))
    if "accuracy" in sections:
        with section(block, "heldout_accuracy"):
            if not has_trl:
                raise RuntimeError("TRL is not installed: pip install -e '.[bench]'")
            say(f"  {name}: held-out accuracy, this harness and TRL")
            train_rows, test_rows = held_out_split(pairs, size["test_pairs"], size["accuracy_train_pairs"])
            # The harness as it is used: its fast options, its default prompt share and truncation.
            spec = dict(base, max_prompt_length=size["max_length"] // 2, truncation="keep_start",
                        ours_extra=accepted(args.ours_options)[0], trl_extra=TRL_BEST)
            acc = block["heldout_accuracy"] = accuracy(spec, train_rows, test_rows, workdir, args.seeds)
            if "min" in block.get("train_speedup_vs_trl", {}):
                keys = ("ours", "trl", "ours_minus_trl_points")
                block["train_speedup_vs_trl"]["accuracy"] = {k: acc[k] for k in keys}
    if "label" in sections:
        with section(block, "label_vs_bare_forward"):
            say(f"  {name}: labeling")
            result = bench_label.run(path, size["max_length"], bench_label.label_samples(pairs, size["label_prompts"]),
                                     args.label_batch_size, args.repeat, workdir)
            runs = result.pop("runs")
            block["label_setup"] = result
            block["label_vs_bare_forward"] = figure("label_vs_bare_forward", [
                ratio(r.get("label_samples_per_s"), r.get("bare_samples_per_s")) for r in runs], runs)
            if result["share_error"]:
                block["label_prefix_sharing_speedup"] = {
                    "error": f"train.label rejects {' '.join(bench_label.SHARE_ARGV)}: {result['share_error']}"}
            else:
                block["label_prefix_sharing_speedup"] = figure("label_prefix_sharing_speedup", [
                    ratio(r.get("label_shared_samples_per_s"), r.get("bare_samples_per_s")) for r in runs], runs)
    if "lora" in sections:
        with section(block, "lora_vs_full"):
            say(f"  {name}: LoRA vs full fine-tuning")
            block["lora_vs_full"] = bench_lora.run(args, base, pairs, tokenizer, size["max_length"], workdir,
                                                   accepted(args.ours_options)[0], say)
    if "sharding" in sections:
        with section(block, "fsdp_memory_vs_ddp"):
            say(f"  {name}: memory per process, DDP vs FSDP on 2 processes")
            from scripts import bench_memory
            from scripts.bench_quality import write_jsonl
            rows = pairs[:2 * args.batch_size]
            spec = {"model": name, "model_path": path, "max_length": size["max_length"], "batch_size": args.batch_size,
                    "threads": max(1, args.threads // 2), "train_file": write_jsonl(os.path.join(workdir, "mem.jsonl"), rows),
                    "test_file": write_jsonl(os.path.join(workdir, "mem-test.jsonl"), rows[:2])}
            result = bench_memory.compare(spec, args.timeout)
            value = result.get("fsdp_over_ddp")
            block["fsdp_memory_vs_ddp"] = {"min": value, "median": value, "target": "about 0.5", **result,
                                           "what": "largest process's parameters + optimizer state after one step, "
                                                   "fsdp / ddp, 2 processes"}
    return block


@contextlib.contextmanager
def section(block: dict, key: str):
    """A section that fails records why under its figure's key; the other sections still run."""
    try:
        yield
    except Exception as err:
        block[key] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}


# ---- output ----------------------------------------------------------------------------------
def say(message: str):
    print(message, file=sys.stderr, flush=True)


def cell(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def notes(key: str, fig: dict) -> str:
    runs = [r for r in fig.get("runs", []) if isinstance(r, dict)]
    if key.startswith("train_speedup") and runs:
        side = "ours_compile" if "compiled" in key else "ours"
        med = {w: statistics.median([r[w]["pairs_per_s"] for r in runs if "pairs_per_s" in r.get(w, {})] or [0])
               for w in (side, "trl")}
        text = f"{side} {med[side]:.3g} vs TRL {med['trl']:.3g} pairs/s (medians)"
        acc = fig.get("accuracy")
        if acc and acc.get("ours") is not None and acc.get("trl") is not None:
            text += f"; held-out accuracy ours {acc['ours']:.3f}, TRL {acc['trl']:.3f}"
        return text
    if key == "hardware_efficiency" and runs:
        achieved = [r["achieved_flops"] for r in runs if "achieved_flops" in r]
        peak = [r["matmul_flops_during"] for r in runs if "matmul_flops_during" in r]
        if achieved:
            dtype = "bf16" if runs[0].get("mixed_precision") == "bf16" else "fp32"  # as the run's metrics say
            return (f"{statistics.median(achieved) / 1e9:.3g} GFLOP/s of a {statistics.median(peak) / 1e9:.3g} "
                    f"GFLOP/s {dtype} matmul (medians)")
    if key == "hardware_efficiency_compiled" and runs:
        eager = [r["eager_after_first_step"] for r in runs if r.get("eager_after_first_step")]
        if eager:
            return f"steps after the first; eager over the same steps {statistics.median(eager):.2f} (median)"
    if key.startswith("label") and runs:
        rate = [r.get("label_shared_samples_per_s" if "sharing" in key else "label_samples_per_s") for r in runs]
        bare = [r.get("bare_samples_per_s") for r in runs]
        rate, bare = [v for v in rate if v], [v for v in bare if v]
        if rate and bare:
            return f"{statistics.median(rate):.3g} vs {statistics.median(bare):.3g} samples/s (medians)"
    if key == "fsdp_memory_vs_ddp" and "param_optimizer_mb" in fig:
        mb, rss = fig["param_optimizer_mb"], fig["peak_rss_mb"]
        return (f"params + optimizer state per process: FSDP {mb['fsdp']:.0f} MB vs DDP {mb['ddp']:.0f} MB; "
                f"peak RSS {rss['fsdp']:.0f} vs {rss['ddp']:.0f} MB (the whole model is loaded before sharding)")
    return fig.get("note", "")


def table(results: dict) -> str:
    lines = ["| model | figure | min | median | target | notes |", "|---|---|---|---|---|---|"]
    for name in MODELS:
        block = results.get(name)
        if block is None:
            continue
        if "error" in block:
            lines.append(f"| {name} | — | | | | not run: {block['error']} |")
            continue
        acc = block.get("heldout_accuracy")
        for key in TARGETS:
            fig = block.get(key)
            if fig is None:
                continue
            note = fig.get("error") or notes(key, fig)
            lines.append(f"| {name} | {key} | {cell(fig.get('min'))} | {cell(fig.get('median'))} | "
                         f"{fig.get('target', ' '.join(map(str, TARGETS[key])))} | {note} |")
        if acc and "train_speedup_vs_trl" not in block:
            note = acc.get("error") or (f"ours {cell(acc['ours'], 3)}, TRL {cell(acc['trl'], 3)}")
            lines.append(f"| {name} | heldout_accuracy | | | ours within 1 point of TRL | {note} |")
        if "lora_vs_full" in block:
            from scripts.bench_lora import table_rows
            lines += table_rows(name, block["lora_vs_full"])
    return "\n".join(lines)


def add_arguments(parser):
    from scripts.bench_quality import DEFAULT_DATA
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parser.add_argument("--out", help="write the figures, their raw runs and the machine here (JSON)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--only", nargs="+", choices=SECTIONS + tuple(ALIASES),
                        help=f"sections to run (default: all of {', '.join(SECTIONS)})")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of every timed run")
    parser.add_argument("--threads", type=int, default=cores,
                        help="torch / OMP / MKL threads of every timed process (default: the cores, %(default)s)")
    parser.add_argument("--real_data", default=str(DEFAULT_DATA),
                        help="HH-RLHF JSONL(.gz) of chosen/rejected transcripts")
    parser.add_argument("--cache_dir", default=str(ROOT / ".cache" / "bench"),
                        help="kept between runs: a GGUF model converted once (smollm2)")
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per optimizer step, both trainers")
    parser.add_argument("--ours_options", nargs="*", default=OURS_FAST,
                        help="Hydra overrides for our fast settings, each used if the config knows it (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="also time ours with compile=true")
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="no",
                        help="training precision of both trainers: fp32, or bf16 autocast over fp32 weights "
                             "(a GPU, or a CPU with bf16 matmuls such as AMX; default: %(default)s)")
    parser.add_argument("--trl_attn", default=None,
                        help="TRL's attn_implementation, e.g. eager (default: the model's own, sdpa here)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a training run is given up")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="accuracy: training seeds")
    parser.add_argument("--label_batch_size", type=int, default=32, help="label: samples per forward")
    parser.add_argument("--lora_pairs", type=int, default=32, help="lora: pairs per timed run, LoRA and full alike")
    parser.add_argument("--lora_options", nargs="*", default=["model.peft.enabled=true"],
                        help="lora: the Hydra overrides that make the LoRA variant (default: %(default)s)")
    encoder = parser.add_argument_group("minilm sizes")
    encoder.add_argument("--speed_pairs", type=int, default=256, help="speed: pairs per timed run")
    encoder.add_argument("--max_length", type=int, default=512, help="tokens per sequence")
    encoder.add_argument("--test_pairs", type=int, default=300, help="accuracy: held-out pairs")
    encoder.add_argument("--accuracy_train_pairs", type=int, default=1000, help="accuracy: training pairs")
    encoder.add_argument("--label_prompts", type=int, default=200, help="label: prompts (x4 samples)")
    decoder = parser.add_argument_group("smollm2 sizes")
    decoder.add_argument("--decoder_pairs", type=int, default=64)
    decoder.add_argument("--decoder_max_length", type=int, default=256)
    decoder.add_argument("--decoder_test_pairs", type=int, default=100)
    decoder.add_argument("--decoder_accuracy_train_pairs", type=int, default=128)
    decoder.add_argument("--decoder_label_prompts", type=int, default=16)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.only = [ALIASES.get(s, s) for s in args.only] if args.only else None
    # Set before torch starts its thread pools; the timed children get the same (bench_train.child_env).
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                      TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # "sequence longer than the model's maximum": encode() cuts it
    results = {"machine": machine(args.threads), "setup": {k: v for k, v in vars(args).items() if k != "out"}}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    pairs = None
    if os.path.isfile(args.real_data):
        from scripts.bench_quality import load_pairs
        pairs, skipped = load_pairs(args.real_data)
        results["data"] = {"path": os.path.abspath(args.real_data), "pairs": len(pairs), "skipped_rows": skipped}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            say(f"{name}:")
            if pairs is None:
                results[name] = {"error": f"no real data at {args.real_data} (pass --real_data)"}
                continue
            os.makedirs(os.path.join(workdir, name))
            try:
                results[name] = model_block(name, args, pairs, os.path.join(workdir, name))
            except Exception as err:  # a section that cannot run records why; the others still run
                results[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            save()
    results["seconds"] = time.perf_counter() - started
    save()
    if args.mixed_precision != "no":
        print(f"training precision: {args.mixed_precision} autocast over fp32 weights, both trainers\n")
    print(table(results))
    if args.out:
        print(f"\nraw figures: {args.out}")


if __name__ == "__main__":
    main()
