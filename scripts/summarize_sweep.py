"""Summarise a Hydra sweep dir: which setting won?

    python scripts/summarize_sweep.py .cache/my-sweep

Writes SWEEP_DIR/summary.md, summary.csv and summary.png (the same files a sweep writes as it
goes, see train/sweep.py) and prints the markdown table. Works on a sweep that is still running.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from anywhere

from train.errors import exit_with_error  # noqa: E402
from train.sweep import job_dirs, to_markdown, write_summary  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="the sweep's dir: hydra.sweep.dir, by default ${cache_dir}/${exp_name}")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.sweep_dir) or not job_dirs(args.sweep_dir):
        exit_with_error(f"{args.sweep_dir} holds no sweep jobs (no <job>/.hydra/overrides.yaml under it)")
    summary = write_summary(args.sweep_dir)
    print(to_markdown(summary), end="")
    print(f"\nwrote {os.path.join(summary['sweep_dir'], 'summary.md')} (+ .csv, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
