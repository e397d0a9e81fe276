"""hydra/launcher=accelerate: each job of a sweep runs as `accelerate launch launch.py <its overrides>`.

`accelerate launch launch.py -m ...` does run, but every process then runs its own copy of the
sweep: each sweeper must pick the same jobs in the same order (an optuna sampler without a fixed
seed does not), every process writes the job's Hydra files and logs, and a job that fails on one
process leaves the others waiting in a collective. Here the sweep runs in one plain process, with
any sweeper, and each job gets fresh processes from `accelerate launch`, as a single run would.

The parent keeps Hydra's bookkeeping (job dir, .hydra/, callbacks such as the sweep summary); the
child runs launch.py in single-run mode, pointed at the job dir with local_run_dir=<job dir>.
"""
import logging
import os
import re
import signal
import subprocess
import sys
from functools import partial

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import open_dict

from train.atomic import final_metrics
from train.errors import UserError

log = logging.getLogger(__name__)


class JobFailed(UserError):
    """The job's processes exited non-zero; the message is their own last error line."""


class AccelerateLauncher(Launcher):
    def __init__(self, config_file=None, num_processes=None, main_process_port=None, extra_args=()):
        self.flags = [*(["--config_file", str(config_file)] if config_file else []),
                      *(["--num_processes", str(num_processes)] if num_processes else []),
                      *(["--main_process_port", str(main_process_port)] if main_process_port else []),
                      *map(str, extra_args)]
        self.config = self.hydra_context = None
        self.terminated = False

    def setup(self, *, hydra_context, task_function, config):
        self.config, self.hydra_context = config, hydra_context
        self.script = os.path.abspath(sys.argv[0])  # the entry point that started the sweep (launch.py)

    def launch(self, job_overrides, initial_job_idx):
        """Jobs run one after another: each one takes all the processes (devices) it is given."""
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        log.info(f"Launching {len(job_overrides)} jobs, each with accelerate launch {' '.join(self.flags)}")
        returns = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            if self.terminated:
                log.warning(f"stopped by a signal before job #{idx}: rerun the same command with resume=auto "
                            "to continue the sweep")
                break
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(job_config):
                job_config.hydra.job.id = job_config.hydra.job.num = idx
            returns.append(run_job(hydra_context=self.hydra_context, task_function=partial(self.run_one, overrides),
                                   config=job_config, job_dir_key="hydra.sweep.dir",
                                   job_subdir_key="hydra.sweep.subdir"))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns

    def run_one(self, overrides, cfg):
        """The job itself: returns the final eval accuracy, as launch.py's main does under -m."""
        hydra = HydraConfig.get()
        job_dir = hydra.runtime.output_dir
        # The child is a single run: point it at this job's dir, and keep its Hydra files out of
        # the way so .hydra/ still holds the sweep's record of the job.
        pinned = [f"local_run_dir={_quoted(job_dir)}", "hydra.output_subdir=null"]
        if cfg.wandb.group is None:  # one wandb group per sweep, as under plain -m
            pinned.append(f"wandb.group={_quoted(os.path.basename(os.path.normpath(hydra.sweep.dir)))}")
        own = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "local_run_dir"]
        command = [sys.executable, "-m", "accelerate.commands.launch", *self.flags, self.script, *own, *pinned]
        returncode, tail = self._run_forwarding_stderr(command)
        if returncode != 0 and not self.terminated:  # a stopped job may exit non-zero (torchrun does)
            raise JobFailed(_last_error(tail) or f"accelerate launch exited with code {returncode}")
        metrics = final_metrics(job_dir)
        return metrics["accuracy"] if metrics else None  # None: stopped early (preempted), no result yet

    def _run_forwarding_stderr(self, command, keep: int = 1 << 16):
        """Run command with its stderr shown as it comes, keeping the last `keep` bytes for the error.

        A SIGTERM (SLURM's warning before the time limit) or Ctrl-C goes on to every process of the
        job, which saves a checkpoint and stops at its next step; no job starts after it. The job runs
        in its own process group so that one signal reaches all of its processes: accelerate launch
        does not pass signals on to a single worker.
        """
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, start_new_session=True)

        def stop(signum, frame):
            self.terminated = True
            os.killpg(proc.pid, signum)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            tail = b""
            for chunk in iter(lambda: proc.stderr.read1(1 << 14), b""):
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                tail = (tail + chunk)[-keep:]
            return proc.wait(), tail.decode(errors="replace")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _quoted(value: str) -> str:
    """A value as a quoted Hydra override string: job dir names hold '=' and ','."""
    return "'" + value.replace("'", "\\'") + "'"


def _last_error(text: str) -> str:
    """launch.py's one-line `error: ...`, else the last exception line of a traceback ("" if none)."""
    # Every process prints the same error, and their writes can land on one line: split them apart.
    text = re.sub(r"(?<=\S)(?=error: )", "\n", text.replace("\r", "\n"))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    exceptions = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Interrupt)\b", line)]
    return exceptions[-1] if exceptions else ""
