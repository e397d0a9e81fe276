"""Hydra multirun sweeps: one record per job, and a summary of the sweep dir that says which setting won.

Layout of a sweep (hydra.sweep.dir = ${cache_dir}/${exp_name}, one subdir per job named from its
overrides, see config/config.yaml):

    <sweep_dir>/
      multirun.yaml                      Hydra's record of the sweep
      summary.md  summary.csv            overrides against final eval metrics; the best row marked
      summary.png                        final eval accuracy against each swept parameter
      <job>/                             a normal run dir (config.yaml, metrics.jsonl, FINAL/, ...)
        .hydra/overrides.yaml            the job's overrides (written by Hydra)
        job_status.json                  written by SummaryCallback: state, wall time, error line

SummaryCallback (registered under hydra.callbacks in config/config.yaml) writes job_status.json
around every job and rewrites the summary after every job and at the end of the sweep. Rewriting
after every job matters: when a job fails, Hydra's sweepers raise after the batch of jobs has run
and on_multirun_end is never called, so the summary written by the last job end is the one that
stays. `python scripts/summarize_sweep.py SWEEP_DIR` writes the same summary on demand.
"""
import csv
import fcntl
import io
import json
import math
import os
import time

import yaml
from hydra.core.utils import JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode

from train import atomic
from train.errors import LOG, NotStarted, UserError, exit_with_error, is_main_process, is_user_fault, storage_error
from train.resolvers import register_resolvers

STATUS_FILE = "job_status.json"
METRICS = ("accuracy", "loss", "margin")  # overall final eval metrics, in table order


# ${job_subdir:...} names each job's dir (hydra.sweep.subdir in config/config.yaml). launch.py
# registers it; so does this module, because a process that runs jobs without importing launch.py (a
# submitit worker) imports it when it unpickles this callback, before Hydra names the job's dir.
register_resolvers()


# ---- checks before the sweep starts --------------------------------------------------------------
def check_sweeper(sweeper_cfg):
    """launch.py returns the final eval accuracy: an optuna study that minimised it would pick the
    worst setting without a word, so it is refused in one line."""
    if "optuna" not in str(sweeper_cfg.get("_target_", "")):
        return
    direction = sweeper_cfg.get("direction")
    if getattr(direction, "name", direction) != "maximize":
        raise UserError("the optuna sweeper must maximise final eval accuracy: use hydra/sweeper=optuna_accuracy "
                        f"or pass hydra.sweeper.direction=maximize (got direction={direction})")


def check_sweep_dir(sweep_dir: str):
    """A sweep does not write its jobs into a single run's dir (one trained with the same exp_name)."""
    if any(os.path.exists(os.path.join(sweep_dir, f)) for f in ("metrics.jsonl", "FINAL", "checkpoints")):
        raise UserError(f"{sweep_dir} holds a single run (not a sweep): choose another exp_name for the sweep")


# ---- per-job status ------------------------------------------------------------------------------
def read_status(job_dir: str) -> dict:
    path = os.path.join(job_dir, STATUS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write_status(job_dir: str, status: dict):
    atomic.write_text(os.path.join(job_dir, STATUS_FILE), json.dumps(status, indent=1))


def error_line(err: BaseException) -> str:
    """One line for the summary: the message of a user mistake, the type and message of a bug."""
    if isinstance(err, OSError) and is_user_fault(err):
        return storage_error("cannot write", err)
    text = (str(err).strip().splitlines() or [""])[0]
    return text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"


def job_started(job_dir: str):
    status = read_status(job_dir)
    status.update(state="running", error=None, started=time.time(),
                  final_at_start=atomic.is_complete(os.path.join(job_dir, "FINAL")))
    _write_status(job_dir, status)


def job_ended(job_dir: str, failed: bool, error: str = None, not_started: bool = False):
    """Wall time adds up over the attempts that trained (a resume continues the clock); a rerun that
    only found FINAL already there adds nothing. not_started: refused after a Ctrl-C stopped an
    earlier job (not a failure of this job's)."""
    status = read_status(job_dir)
    seconds = time.time() - status.get("started", time.time())
    if not status.get("final_at_start"):
        status["wall_time_s"] = status.get("wall_time_s", 0.0) + seconds
    if not_started:
        state = "not started"
    elif failed:
        state = "failed"
    else:
        state = "skipped" if status.get("final_at_start") else "completed"
    status.update(state=state, error=error, last_attempt_s=seconds)
    _write_status(job_dir, status)


class SummaryCallback(Callback):
    """Writes <job>/job_status.json around each job and keeps <sweep_dir>/summary.* up to date.

    Under `accelerate launch launch.py -m ...` every process runs the sweep; the main one writes."""

    def on_multirun_start(self, config, **kwargs):
        try:  # before any job starts, in the process that runs the sweeper
            check_sweeper(config.hydra.sweeper)
            check_sweep_dir(config.hydra.sweep.dir)
        except UserError as err:
            exit_with_error(err)

    def on_job_start(self, config, **kwargs):
        if config.hydra.mode == RunMode.MULTIRUN and is_main_process():
            job_started(config.hydra.runtime.output_dir)

    def on_job_end(self, config, job_return, **kwargs):
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        failed = job_return.status == JobStatus.FAILED
        # _return_value holds the exception of a failed job; the public property would re-raise it.
        err = job_return._return_value if failed else None
        line = error_line(err) if failed else None
        if failed and is_user_fault(err):
            # The sweeper re-raises the first failed job's exception once its batch has run, and Hydra
            # prints it with a traceback; a user mistake gets one line instead, printed by the main
            # process only (the others print an empty one), that points at the summary.
            job = os.path.relpath(config.hydra.runtime.output_dir, config.hydra.sweep.dir)
            what = line if isinstance(err, NotStarted) else f"failed: {line}"
            compact = CompactHydraException(
                f"error: job {job} {what}; every job's outcome: "
                f"{os.path.join(config.hydra.sweep.dir, 'summary.md')}" if is_main_process() else "")
            compact.__cause__ = err  # HYDRA_FULL_ERROR=1 still shows where it was raised
            job_return._return_value = compact
        if not is_main_process():
            return
        if failed and LOG.handlers:  # the job's launch.log, which Hydra's logging still points at
            LOG.error(line)
        job_ended(config.hydra.runtime.output_dir, failed, line,
                  not_started=isinstance(err, NotStarted))
        write_summary(config.hydra.sweep.dir)

    def on_multirun_end(self, config, **kwargs):
        if is_main_process():
            write_summary(config.hydra.sweep.dir, sweep_over=True)


# ---- reading a sweep dir -------------------------------------------------------------------------
def job_dirs(sweep_dir: str) -> list:
    """Every dir under sweep_dir that Hydra ran a job in (it holds .hydra/overrides.yaml)."""
    found = []
    for root, dirs, _ in os.walk(sweep_dir):
        if root != sweep_dir and os.path.isfile(os.path.join(root, ".hydra", "overrides.yaml")):
            found.append(root)
            dirs[:] = []  # a job dir holds no other jobs
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def _strip_key(key: str) -> str:
    return key.lstrip("+~")


def job_overrides(job_dir: str) -> dict:
    """key -> value of the job's overrides, without the keys that do not change the result
    (those excluded from the dir name: resume, cache_dir, wandb.mode, ...)."""
    with open(os.path.join(job_dir, ".hydra", "overrides.yaml")) as f:
        overrides = yaml.safe_load(f) or []
    excluded = set()
    hydra_yaml = os.path.join(job_dir, ".hydra", "hydra.yaml")
    if os.path.exists(hydra_yaml):
        with open(hydra_yaml) as f:
            hydra = yaml.safe_load(f)["hydra"]
        excluded = set(hydra["job"]["config"]["override_dirname"]["exclude_keys"] or [])
    pairs = [o.split("=", 1) for o in overrides if "=" in o]
    return {_strip_key(k): v for k, v in pairs if _strip_key(k) not in excluded}


def read_job(sweep_dir: str, job_dir: str, sweep_over: bool = False) -> dict:
    """One row: overrides, status, final eval metrics (from FINAL/metrics.json), wall time, and a note
    (the error of a failed job, or what the last attempt of a finished one did)."""
    status = read_status(job_dir)
    metrics = atomic.final_metrics(job_dir)
    row = {"job": os.path.relpath(job_dir, sweep_dir), "params": job_overrides(job_dir), "metrics": metrics or {},
           "wall_time_s": status.get("wall_time_s"), "note": status.get("error") or ""}
    state = status.get("state")
    if metrics is not None:
        row["status"] = "done"
        if state == "failed":  # e.g. a rerun without resume=auto refused to overwrite FINAL
            row["note"] = f"last attempt failed: {row['note']}"
        elif state == "skipped":
            row["note"] = "rerun skipped it: already finished"
    elif state in ("failed", "not started"):
        row["status"] = state
    elif state == "running":
        row["status"] = "interrupted" if sweep_over else "running"
    elif state in ("completed", "skipped"):
        row["status"] = "unfinished"  # returned without FINAL: stopped by a signal
        row["note"] = "no FINAL: stopped early; rerun the sweep with resume=auto"
    else:
        row["status"] = "unknown"  # no job_status.json: run without the summary callback
    return row


def sweep_keys(sweep_dir: str) -> set:
    """Keys the last sweep command swept (lr=1e-5,1e-4, lr=interval(...), hydra.sweeper.params)."""
    path = os.path.join(sweep_dir, "multirun.yaml")
    if not os.path.exists(path):
        return set()
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with open(path) as f:
        hydra = yaml.safe_load(f)["hydra"]
    overrides = OverridesParser.create().parse_overrides(hydra["overrides"]["task"] or [])
    keys = {_strip_key(o.key_or_group) for o in overrides if o.is_sweep_override()}
    return keys | set((hydra.get("sweeper") or {}).get("params") or {})


def swept_params(rows: list, swept: set = frozenset()) -> list:
    """Columns: the swept keys and any other override that differs between jobs (else every key)."""
    keys = sorted({k for r in rows for k in r["params"]})
    chosen = [k for k in keys if k in swept or len({r["params"].get(k) for r in rows}) > 1]
    return chosen or keys


def best_row(rows: list):
    """The finished job with the highest final eval accuracy; ties go to the lower loss."""
    done = [r for r in rows if r["status"] == "done" and _finite(r["metrics"].get("accuracy"))]
    if not done:
        return None
    return max(done, key=lambda r: (r["metrics"]["accuracy"], -_number(r["metrics"].get("loss"))))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _number(x, default=math.inf) -> float:
    return x if _finite(x) else default


def summarize(sweep_dir: str, sweep_over: bool = False) -> dict:
    """Rows sorted best first (finished jobs by accuracy, then the others), with columns and best."""
    sweep_dir = os.path.abspath(sweep_dir)
    rows = [read_job(sweep_dir, d, sweep_over) for d in job_dirs(sweep_dir)]
    best = best_row(rows)
    for r in rows:
        r["best"] = r is best
    rows.sort(key=lambda r: (not r["best"], r["status"] != "done",
                             -_number(r["metrics"].get("accuracy"), -math.inf), _number(r["metrics"].get("loss")),
                             r["job"]))
    subsets = sorted({k for r in rows for k in r["metrics"] if k.startswith("accuracy/")})
    params = swept_params(rows, sweep_keys(sweep_dir))
    for r in rows:  # a job that left a swept key at its default: the value it ran with
        for p in params:
            if p not in r["params"]:
                r["params"][p] = _job_default(os.path.join(sweep_dir, r["job"]), p)
    return {"sweep_dir": sweep_dir, "rows": rows, "params": params,
            "metrics": [METRICS[0], *subsets, *METRICS[1:]], "best": best}


def _job_default(job_dir: str, key: str) -> str:
    """The value a job ran `key` with when its overrides do not set it: a config group's choice (from
    Hydra's .hydra/hydra.yaml), else the key in .hydra/config.yaml; "" when neither says."""
    try:
        with open(os.path.join(job_dir, ".hydra", "hydra.yaml")) as f:
            choices = yaml.safe_load(f)["hydra"]["runtime"]["choices"] or {}
        if key in choices:
            return str(choices[key])
        with open(os.path.join(job_dir, ".hydra", "config.yaml")) as f:
            value = yaml.safe_load(f)
        for part in key.split("."):
            value = value[part]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return ""
    return "" if isinstance(value, (dict, list)) or value is None else str(value)


# ---- writing the summary -------------------------------------------------------------------------
def _table(summary: dict) -> tuple:
    fixed = {"best", "status", *summary["metrics"], "wall_time_s", "note", "job"}
    # A swept key named like a result column (the loss config group: loss=hinge) gets a suffix, or
    # the CSV would hold two 'loss' columns and a dict reader would keep only one.
    params = [f"{p}_override" if p in fixed else p for p in summary["params"]]
    header = ["best", *params, "status", *summary["metrics"], "wall_time_s", "note", "job"]
    body = []
    for r in summary["rows"]:
        body.append([r["best"], *[r["params"].get(p, "") for p in summary["params"]], r["status"],
                     *[r["metrics"].get(m, "") for m in summary["metrics"]], r["wall_time_s"], r["note"],
                     r["job"]])
    return header, body


def to_csv(summary: dict) -> str:
    header, body = _table(summary)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in body:  # full precision, so the CSV equals FINAL/metrics.json
        writer.writerow([int(row[0])] + ["" if v is None else v for v in row[1:]])
    return out.getvalue()


def _cell(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def to_markdown(summary: dict, plot_name: str = None) -> str:
    rows, best = summary["rows"], summary["best"]
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [f"# Sweep summary: {os.path.basename(summary['sweep_dir'])}", "",
             f"{summary['sweep_dir']}: {len(rows)} jobs, "
             + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ".", ""]
    if best is not None:
        setting = " ".join(f"{p}={best['params'].get(p, '')}" for p in summary["params"]) or best["job"]
        lines += [f"**Best** (highest final eval accuracy, ties to the lower loss): `{setting}`: "
                  f"accuracy {best['metrics']['accuracy']:.4f}, loss {_cell(best['metrics'].get('loss'))}.", ""]
    else:
        lines += ["No job has finished yet.", ""]
    header, body = _table(summary)
    header = header[:-1]  # the job dir is in the CSV; here it repeats the override columns
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in body:
        *values, wall, note = row[1:-1]
        cells = ["**best**" if row[0] else ""] + [_cell(v) for v in values]
        cells += [f"{wall:.1f}" if wall is not None else "", _cell(note)]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        lines += ["", "Jobs without a result (dir under the sweep dir, then what happened):", ""]
        lines += [f"- `{r['job']}`: {r['status']}" + (f": {r['note']}" if r["note"] else "") for r in failed]
    if plot_name:
        lines += ["", f"![final eval accuracy against each swept parameter]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> bool:
    """One panel per swept parameter: final eval accuracy of each finished job, the best one starred."""
    done = [r for r in summary["rows"] if r["status"] == "done" and _finite(r["metrics"].get("accuracy"))]
    params = summary["params"]
    if not done or not params:
        return False
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 3.8), squeeze=False)
    for ax, param in zip(axes[0], params):
        values = [r["params"].get(param, "") for r in done]
        if all(_as_float(v) is not None for v in values):
            xs = [float(v) for v in values]
            if min(xs) > 0 and max(xs) / min(xs) >= 3:  # learning rates and the like
                ax.set_xscale("log")
            else:
                ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        else:  # words (model=..., datasets=[...]): one position per value
            labels = sorted(set(values))
            xs = [labels.index(v) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 3 else 0)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ys = [r["metrics"]["accuracy"] for r in done]
        ax.scatter(xs, ys, color="tab:blue", zorder=2)
        for x, y, r in zip(xs, ys, done):
            if r["best"]:
                ax.scatter([x], [y], marker="*", s=250, color="tab:red", zorder=3, label="best")
                ax.legend(loc="best")
        ax.set_xlabel(param)
        ax.set_ylabel("final eval accuracy")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic.write_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return True


def _as_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def write_summary(sweep_dir: str, sweep_over: bool = False) -> dict:
    """summary.md, summary.csv and summary.png in sweep_dir. Parallel jobs (joblib, submitit) end at
    the same time: a lock makes the last writer the one that saw every job's record."""
    sweep_dir = os.path.abspath(sweep_dir)
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, ".summary.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary = summarize(sweep_dir, sweep_over)
        png = os.path.join(sweep_dir, "summary.png")
        has_plot = plot(summary, png)
        if not has_plot and os.path.exists(png):
            os.remove(png)  # a stale plot would contradict the table
        atomic.write_text(os.path.join(sweep_dir, "summary.csv"), to_csv(summary))
        atomic.write_text(os.path.join(sweep_dir, "summary.md"),
                          to_markdown(summary, "summary.png" if has_plot else None))
    return summary

