"""What a model or run dir is, read from its files alone: no torch or transformers, so the command
lines (train.label, train.evaluate, train.export) check their arguments in about a second before
importing them (about 8 s).

- run_config(): a FINAL or checkpoint dir's training config (<run>/config.yaml).
- model_kind(): a FINAL/classifier dir, or a checkpoint dir (weights only, rebuilt from its run).
- settings(): formatting and dtype for scoring: the run's, command-line values winning.
- position_limit(): the longest input a model's learned absolute positions allow.
"""
import json
import os

from omegaconf import OmegaConf

from train.data.formatting import DEFAULT_TRUNCATION
from train.errors import UserError

SHARDED = "sharded"  # the DCP dir of a sharded checkpoint


def is_sharded(path: str) -> bool:
    return os.path.isdir(os.path.join(path, SHARDED))


# Model types whose positions are learned absolute embeddings: a sequence past them has no
# position and stops the run with an IndexError, maybe hours in. The number is the positions an
# input cannot use (RoBERTa's count from padding_idx + 1). Rotary models have no such table.
ABSOLUTE_POSITIONS = {"bert": 0, "distilbert": 0, "electra": 0, "gpt2": 0, "roberta": 2, "xlm-roberta": 2,
                      "camembert": 2}


def position_limit(config: dict):
    """The longest input a model's learned absolute positions allow (a config.json's dict), or None
    when it has no such table (rotary and relative positions)."""
    kind = config.get("model_type")
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if kind not in ABSOLUTE_POSITIONS or not limit or config.get("position_embedding_type", "absolute") != "absolute":
        return None
    return limit - ABSOLUTE_POSITIONS[kind]


# Used only for a plain classifier dir with no training run: HALOs' labeler defaults.
PLAIN_DEFAULTS = {"max_length": 2048, "max_prompt_length": 1024, "truncation": DEFAULT_TRUNCATION}


def run_config(path: str):
    """The training run's resolved config for <run>/FINAL or <run>/checkpoints/step-N; None if absent."""
    parent = os.path.dirname(os.path.abspath(os.path.normpath(path)))
    run_dir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent
    candidate = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(candidate):
        return None
    cfg = OmegaConf.load(candidate)
    return cfg if OmegaConf.select(cfg, "model.max_length") is not None else None  # not some other YAML


def model_kind(path: str, option: str = "--reward_model_path ") -> str:
    """'pretrained' (FINAL, any HF classifier dir or hub id) or 'checkpoint' (weights, no config.json)."""
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, "config.json")) or not os.path.exists(path):
        return "pretrained"
    if os.path.isfile(os.path.join(path, "model.safetensors")) or is_sharded(path):
        return "checkpoint"
    raise UserError(f"{option}{path}: neither a FINAL/classifier dir (config.json) "
                    "nor a checkpoint dir (model.safetensors, or sharded/ from an FSDP run)")


def settings(path: str, args) -> dict:
    """Formatting and dtype for scoring: the training run's unless overridden on the command line."""
    cfg = run_config(os.path.normpath(path))
    if cfg is None and model_kind(path) == "checkpoint":
        raise UserError(f"--reward_model_path {path}: a checkpoint dir needs its run's config.yaml "
                        "two levels up (<run>/checkpoints/step-N)")
    if cfg is not None:
        base = {k: cfg.model[k] for k in PLAIN_DEFAULTS}
        base["dtype"] = cfg.model.dtype
    else:  # no training run: HALOs' defaults, within the positions the model has (BERT: 512)
        base = {**PLAIN_DEFAULTS, "dtype": "float32"}
        config_file = os.path.join(path, "config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                config = json.load(f)
            positions = position_limit(config) or config.get("max_position_embeddings") or base["max_length"]
            base["max_length"] = min(base["max_length"], positions)
    for key in ("max_length", "max_prompt_length", "dtype"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    base["max_prompt_length"] = min(base["max_prompt_length"], base["max_length"])
    return {**base, "run_config": cfg}
