"""Train a reward model: python launch.py [overrides] or accelerate launch launch.py [overrides].

See README.md. Config lives in config/; the schema with every key's meaning is train/config.py.
"""
import contextlib
import sys

import hydra

from train.atomic import final_metrics
from train.config import check_overrides, create_run_dirs, in_multirun, register, validate
from train.errors import UserError, exit_with_error, is_user_fault, leave, storage_error

register()


@hydra.main(config_path="config", config_name="config", version_base=None)
def main(cfg):
    """Returns the final eval accuracy: the objective a sweeper (hydra/sweeper=optuna_accuracy) maximises."""
    try:
        with contextlib.ExitStack() as held:  # holds the run-dir lock until the run ends, however it ends
            return run(cfg, held)
    except (UserError, OSError) as err:
        if not is_user_fault(err):
            raise  # not a storage fault: a bug, keep its traceback
        if in_multirun():  # let the sweep record this job as failed and go on with the others
            raise
        exit_with_error(err if isinstance(err, UserError) else storage_error("cannot write", err))


def run(cfg, held):
    # The config is checked before torch, transformers and datasets are imported (about 8 s), so a
    # mistake in it is reported in a second or two.
    validate(cfg)
    from train.build import build

    trainer = None
    try:
        trainer = build(cfg, held)
        if trainer is None:  # resume=auto on a finished run: report the result it already has
            return final_metrics(cfg.local_run_dir)["accuracy"]
        status = trainer.train()
        return trainer.last_eval["accuracy"] if status == "done" else None  # None: preempted, no result yet
    finally:
        if trainer is not None:  # also after a failure, so the next job of a sweep gets its own wandb run
            trainer.cleanup(failed=sys.exc_info()[0] is not None)


if __name__ == "__main__":
    try:
        create_run_dirs(check_overrides(sys.argv[1:]))
    except UserError as err:
        exit_with_error(err)
    main()
    leave(0)  # after every job: `accelerate launch launch.py -m` runs them all in one group
