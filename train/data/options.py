"""The options of each dataset source (datasets.<name> in the config), typed and checked.

They live with the data code, which reads them; train/config.py puts them in the schema.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
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
class DataSource:
    """Preference data from a local file or dir, or from a hub dataset in the local HF cache."""
    path: Optional[str] = None  # .jsonl/.json/.parquet/.csv (also .gz) or a save_to_disk dir; wins over hub
    hub: Optional[str] = None  # hub dataset id, read from the local HF cache (offline) or the hub
    name: Optional[str] = None  # hub config name
    subsets: Optional[List[str]] = None  # hub data_dirs, each read and reported as its own subset
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    split: str = "train"  # the training split of a hub dataset or save_to_disk dir
    test_split: Optional[str] = None  # its held-out split; None -> test_path, else test_fraction
    test_path: Optional[str] = None  # a held-out file
    test_fraction: float = 0.1  # seeded share of prompts held out when there is no test split
    split_column: Optional[str] = None  # rows carry their split in this column (values: split, test_split)
    format: str = "auto"  # auto | standard | conversational | implicit | sharegpt | feedback | scored | shp | helpsteer2 | ...
    columns: Dict[str, str] = field(default_factory=dict)  # {our field: their column}, e.g. {prompt: question}
    subset: Optional[str] = None  # subset name of rows that carry none; None -> "default"
    weight: float = 1.0  # share of this source's training pairs used: 0.5 half, 2 each twice
    max_examples: Optional[int] = None  # cap on this source's training pairs (after weight)
    on_error: str = "raise"  # raise | skip (skipped rows are counted in the log)
    divergent: str = "skip"  # implicit prompts that differ before the last assistant turn: skip | raise
    pairs: str = "best_vs_worst"  # scored responses -> pairs: best_vs_worst | all
    min_score_gap: float = 0.0  # scored: pairs need scores at least this far apart (and not equal)
    max_pairs_per_prompt: Optional[int] = None  # scored: seeded sample of at most this many pairs per prompt
    min_score_ratio: Optional[float] = None  # shp: keep pairs whose score_ratio is at least this


# The options of each dataset source under datasets.<name>: synthetic has its own, every other
# config/datasets/<name>.yaml is a DataSource (jsonl, feedback, hh, shp, ... or a user's own).
SOURCE_SCHEMAS = {"synthetic": SyntheticSource}
# Allowed ranges of their numeric options (train.checks.check_ranges).
SOURCE_RANGES = {
    "synthetic": {"n_train": (0, None), "n_test": (0, None), "seed": (0, 2**32 - 1)},
    "data": {"test_fraction": ([0], [1]), "weight": (0, None), "max_examples": (1, None),
             "min_score_gap": (0, None), "max_pairs_per_prompt": (1, None), "min_score_ratio": (0, None)},
}
CHOICES = {"on_error": ("raise", "skip"), "divergent": ("skip", "raise"), "pairs": ("best_vs_worst", "all")}
CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "config" / "datasets"


def known_sources() -> list:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def schema_of(name: str):
    """The options dataclass of datasets.<name>; UserError for a name with no config/datasets YAML."""
    if name not in known_sources():
        raise UserError(f"unknown dataset source '{name}'{suggest(name, known_sources())}; "
                        f"known: {', '.join(known_sources())}")
    return SOURCE_SCHEMAS.get(name, DataSource)


def source_options(name: str, options) -> DictConfig:
    """A dataset source's options checked against its schema (unknown keys are errors)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema_of(name)), options)
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
    from train.data.formats import FORMAT_NAMES

    merged = source_options(name, options)
    schema = schema_of(name)
    check_ranges(merged, SOURCE_RANGES["synthetic" if schema is SyntheticSource else "data"], f"datasets.{name}.")
    if schema is DataSource:
        choices = dict(CHOICES, format=FORMAT_NAMES)
        for key, allowed in choices.items():
            if merged[key] not in allowed:
                raise UserError(f"datasets.{name}.{key}={merged[key]}: expected one of {', '.join(allowed)}"
                                f"{suggest(str(merged[key]), allowed)}")
        if not merged.path and not merged.hub:
            raise UserError(f"datasets.{name} names no data: pass ++datasets.{name}.path=FILE "
                            f"(or ++datasets.{name}.hub=ID)")
    return merged
