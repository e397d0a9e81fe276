"""Typed config schema (registered with Hydra's ConfigStore) and checks that run before any model loads.

Every key here has a default with its unit, and every key is read somewhere. The schema is the
base of config/config.yaml, so Hydra rejects keys that are not in it; check_overrides() turns a
misspelled command-line key into one line with a suggestion before Hydra prints its own error.
"""
import difflib
import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, MissingMandatoryValue, ValidationError

from train.data.formatting import TRUNCATION_POLICIES
from train.errors import UserError


@dataclass
class WandbConfig:
    enabled: bool = False  # log to wandb as well as metrics.jsonl
    project: str = "reward-models"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled; offline needs no network
    group: Optional[str] = None  # runs of one sweep share a group (set for you under -m)


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = MISSING  # local dir or hub id (required); null only with init_config
    tokenizer_name_or_path: Optional[str] = None  # None -> name_or_path
    init_config: Optional[Dict[str, Any]] = None  # build a random model from this architecture instead
    dtype: str = "float32"  # float32 | bfloat16 | float16; CPUs here have no fast bf16
    max_length: int = 256  # tokens in prompt + response, special tokens included
    max_prompt_length: int = 128  # tokens kept of the prompt (cut from the left)
    truncation: str = "cut_prompt_left"  # cut_prompt_left | drop (see train/data/formatting.py)
    attn_implementation: Optional[str] = None  # e.g. sdpa, flash_attention_2; None -> library default
    activation_checkpointing: bool = False  # trade compute for memory; off: slower on CPU
    disable_dropout: bool = True  # dropout halves CPU speed and adds noise to the scalar reward
    trust_remote_code: bool = False  # run code shipped with a checkpoint only when set


@dataclass
class LossConfig:
    trainer: str = "BradleyTerryTrainer"  # a class in train/trainers.py
    center_rewards_coefficient: float = 0.0  # weight of mean((s_c + s_r)^2); 0.01 is typical


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


@dataclass
class Config:
    seed: int = 0  # model init (random models), data order, everything random
    exp_name: str = "reward-model"
    cache_dir: str = ".cache"  # run dirs live under it
    local_run_dir: str = "${cache_dir}/${exp_name}"  # the run directory (see README)
    lr: float = 5e-5  # peak learning rate
    optimizer: str = "AdamW"  # a class in torch.optim
    weight_decay: float = 0.0  # not applied to biases and norms
    warmup: float = 0.1  # fraction of optimizer steps spent warming up
    scheduler: str = "linear"  # any transformers.get_scheduler name: linear, cosine, constant_with_warmup...
    n_epochs: int = 1
    n_examples: Optional[int] = None  # cap on training pairs over all epochs; None -> n_epochs of data
    batch_size: int = 32  # pairs per optimizer step, over all processes
    microbatch_size: int = 16  # pairs per forward on each process; accumulation is derived
    eval_batch_size: int = 64  # pairs per eval forward on each process
    n_eval_examples: int = 600  # size of the FIXED eval subset drawn from the test splits
    eval_every: int = 1024  # examples between evals (rounded up to a whole optimizer step)
    save_every: Optional[int] = None  # examples between checkpoints; None -> no checkpoints
    keep_last_n_checkpoints: int = 2  # older checkpoints are pruned; the newest complete one stays
    do_first_eval: bool = True  # eval before the first step, to log the untrained baseline
    max_grad_norm: float = 1.0  # clip threshold; the pre-clip norm is logged
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does
    resume: Optional[str] = None  # None | auto | path to a checkpoint dir
    write_predictions: bool = False  # write generated_predictions.jsonl for the eval set at the end
    num_workers: int = 0  # DataLoader workers; 0 is fastest for short pre-tokenised pairs
    wandb: WandbConfig = field(default_factory=WandbConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: Dict[str, Any] = field(default_factory=dict)


def _package_dir(module: str, sub: str = "") -> str:
    """${pkg:module,sub}: a directory inside an installed package, e.g. bundled model weights."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(f"package '{module}' is not installed (needed by the model config)")
    return str(Path(spec.origin).parent / sub)


def register():
    """Register the schema and resolvers; called once by launch.py before Hydra composes."""
    ConfigStore.instance().store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("pkg"):
        OmegaConf.register_new_resolver("pkg", _package_dir)


GROUPS = {"loss", "model", "datasets"}
NESTED = {"loss": LossConfig, "model": ModelConfig, "wandb": WandbConfig}


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_type(dotted: str, ftype, value):
    """Numbers and booleans on the command line: a wrong type is one line, not Hydra's five."""
    if value is None or isinstance(value, str) and value.startswith("${"):
        return
    allowed = {int: (int,), float: (int, float), bool: (bool,)}
    base = next((t for t in allowed if ftype in (t, Optional[t])), None)
    if base is None:
        return
    if isinstance(value, bool) and base is not bool or not isinstance(value, allowed[base]):
        kind = {int: "a whole number", float: "a number", bool: "true or false"}[base]
        raise UserError(f"config key '{dotted}' must be {kind}, got '{value}'")


def _check_key(dotted: str):
    parts = dotted.split(".")
    schema, prefix = Config, ""
    if parts[0] == "datasets" and len(parts) >= 2:
        source = SOURCE_SCHEMAS.get(parts[1])
        if source is None:
            raise UserError(f"unknown dataset source '{parts[1]}'{_suggest(parts[1], SOURCE_SCHEMAS)}; "
                            f"known: {', '.join(SOURCE_SCHEMAS)}")
        if len(parts) == 2:
            return
        schema, prefix, parts = source, f"datasets.{parts[1]}.", parts[2:]
    for i, name in enumerate(parts):
        names = {f.name: f for f in fields(schema)}
        if name not in names:
            raise UserError(f"unknown config key '{prefix}{name}'{_suggest(name, names)}")
        prefix += name + "."
        if i == len(parts) - 1:
            return names[name].type
        ftype = NESTED.get(name) if schema is Config else None
        if ftype is None:
            return None
        schema = ftype


def check_overrides(argv: List[str]):
    """Reject misspelled keys on the command line with one line, before Hydra composes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception as err:  # Hydra's grammar errors are already one clear line
        raise UserError(str(err).splitlines()[0])
    config_dir = Path(__file__).resolve().parent.parent / "config"
    for override in overrides:
        key = override.key_or_group
        if key in GROUPS and override.is_sweep_override() is False:
            value = override.value()
            for name in value if isinstance(value, list) else [value]:
                if not (config_dir / key / f"{name}.yaml").is_file():
                    known = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
                    raise UserError(f"unknown {key} '{name}'{_suggest(str(name), known)}; known: {', '.join(known)}")
        if key.startswith("hydra") or key in GROUPS or override.is_delete():
            continue
        ftype = _check_key(key)
        if ftype is not None and not override.is_sweep_override():
            _check_type(key, ftype, override.value())


def validate(cfg: DictConfig):
    """Checks on values, run before any model loads: one line per mistake."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        key = err.full_key
        hint = " (pass model.name_or_path=<local dir or hub id>)" if key == "model.name_or_path" else ""
        raise UserError(f"config key '{key}' is required but not set{hint}")
    except (ConfigKeyError, ValidationError) as err:
        raise UserError(f"config error: {str(err).splitlines()[0]}")
    except InterpolationResolutionError as err:  # e.g. ${pkg:...} of a package that is not installed
        raise UserError(str(err).splitlines()[0].replace("UserError raised while resolving interpolation: ", ""))
    if cfg.model.name_or_path is None and cfg.model.init_config is None:
        raise UserError("set model.name_or_path (a local dir or hub id) or model.init_config")
    if cfg.model.truncation not in TRUNCATION_POLICIES:
        raise UserError(f"model.truncation must be one of {TRUNCATION_POLICIES}, got '{cfg.model.truncation}'")
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise UserError(f"on_nonfinite must be 'stop' or 'skip', got '{cfg.on_nonfinite}'")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise UserError(f"wandb.mode must be offline, online or disabled, got '{cfg.wandb.mode}'")
    for key in ("batch_size", "microbatch_size", "eval_batch_size", "n_epochs", "n_eval_examples",
                "eval_every", "keep_last_n_checkpoints"):
        if cfg[key] < 1:
            raise UserError(f"{key} must be at least 1, got {cfg[key]}")
    if cfg.n_examples is not None and cfg.n_examples < cfg.batch_size:
        raise UserError(f"n_examples ({cfg.n_examples}) must be at least batch_size ({cfg.batch_size})")
    _check_names(cfg)
    if not 0 <= cfg.warmup < 1:
        raise UserError(f"warmup is a fraction of the steps in [0, 1), got {cfg.warmup}")
    if not cfg.datasets:
        raise UserError("no dataset selected: pass datasets=[synthetic] or datasets=[jsonl] ...")
    for name, options in cfg.datasets.items():
        source_options(name, options)


def _check_names(cfg):
    """Names that pick a class or function, checked before any model loads."""
    import torch
    from transformers import SchedulerType

    from train import trainers
    from train.models import DTYPES

    schedulers = [t.value for t in SchedulerType]
    if cfg.scheduler not in schedulers:
        raise UserError(f"scheduler '{cfg.scheduler}' is not one of {', '.join(schedulers)}")
    if cfg.model.dtype not in DTYPES:
        raise UserError(f"model.dtype '{cfg.model.dtype}' is not one of {', '.join(DTYPES)}")
    if not isinstance(getattr(torch.optim, cfg.optimizer, None), type):
        raise UserError(f"optimizer '{cfg.optimizer}' is not a class in torch.optim")
    trainer = getattr(trainers, cfg.loss.trainer, None)
    if not (isinstance(trainer, type) and issubclass(trainer, trainers.BasicTrainer)):
        raise UserError(f"loss.trainer '{cfg.loss.trainer}' is not a trainer class in train/trainers.py")


def source_options(name: str, options) -> DictConfig:
    """A dataset source's options checked against its schema (unknown keys are errors)."""
    if name not in SOURCE_SCHEMAS:
        raise UserError(f"unknown dataset source '{name}'{_suggest(name, SOURCE_SCHEMAS)}")
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
