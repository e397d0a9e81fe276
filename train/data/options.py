"""The options of each dataset source (datasets.<name> in the config), typed and checked.

They live with the data code, which reads them; train/config.py puts them in the schema.
"""
from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

from train.checks import check_ranges, suggest
from train.errors import UserError


@dataclass
class SyntheticSource:
    n_train: int = 4000  # generated training pairs
    n_test: int = 600  # generated held-out pairs (held-out templates and values)
    subsets: Optional[List[str]] = None  # None -> all of train.data.synthetic.SUBSETS
    seed: int = 0  # generator seed, separate from the training seed


@dataclass
class FileSource:
    path: str = MISSING  # JSON array or JSONL file
    test_path: Optional[str] = None  # held-out file; None -> split test_fraction off path
    test_fraction: float = 0.1  # used only without test_path
    on_error: str = "raise"  # raise | skip (skipped rows are counted in the log)


# The options of each dataset source under datasets.<name>; a new source adds one entry.
SOURCE_SCHEMAS = {"synthetic": SyntheticSource, "jsonl": FileSource, "feedback": FileSource}
# Allowed ranges of their numeric options (train.checks.check_ranges).
SOURCE_RANGES = {
    "synthetic": {"n_train": (0, None), "n_test": (0, None), "seed": (0, 2**32 - 1)},
    "jsonl": {"test_fraction": ([0], [1])},
    "feedback": {"test_fraction": ([0], [1])},
}


def source_options(name: str, options) -> DictConfig:
    """A dataset source's options checked against its schema (unknown keys are errors)."""
    if name not in SOURCE_SCHEMAS:
        raise UserError(f"unknown dataset source '{name}'{suggest(name, SOURCE_SCHEMAS)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SOURCE_SCHEMAS[name]), options)
        OmegaConf.to_container(merged, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise UserError(f"config key 'datasets.{name}.{err.full_key}' is required but not set "
                        f"(pass ++datasets.{name}.{err.full_key}=...)")
    except (ConfigKeyError, ValidationError) as err:
        key = getattr(err, "full_key", "") or ""
        raise UserError(f"bad option for dataset '{name}': {key} {str(err).splitlines()[0]}".strip())
    return merged


def checked_source_options(name: str, options) -> DictConfig:
    """source_options plus the range checks: what validate() runs before any model loads."""
    merged = source_options(name, options)
    check_ranges(merged, SOURCE_RANGES.get(name, {}), f"datasets.{name}.")
    return merged
