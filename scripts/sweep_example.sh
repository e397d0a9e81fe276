#!/usr/bin/env bash
# A small sweep on the default model (MiniLM) and its summary: 2 learning rates x 2 reward-centering
# coefficients = 4 jobs, run 2 at a time by the joblib launcher (each job gets half the CPU cores).
# On a 2-core laptop CPU the whole sweep takes a few minutes.
#
#   bash scripts/sweep_example.sh                     # the sweep, then .cache/sweep-example/summary.md
#   bash scripts/sweep_example.sh model=tiny-llama    # extra overrides go to every job
#
# Rerunning the same command continues the sweep: finished jobs are skipped (resume=auto),
# interrupted ones resume from their newest checkpoint.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=${CACHE:-.cache}
EXP=${EXP:-sweep-example}

"$PYTHON" launch.py -m exp_name="$EXP" cache_dir="$CACHE" resume=auto \
    hydra/launcher=joblib hydra.launcher.n_jobs=2 \
    datasets.synthetic.n_train=512 datasets.synthetic.n_test=128 n_eval_examples=128 eval_every=256 \
    lr=3e-5,1e-4 loss.center_rewards_coefficient=0,0.01 "$@"
status=$?  # non-zero when a job failed; the summary lists it

"$PYTHON" scripts/summarize_sweep.py "$CACHE/$EXP"
exit $status
