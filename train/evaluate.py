"""python -m train.evaluate: score held-out preference pairs with a trained reward model and report
accuracy (overall, per source, per subset), margin, calibration and length bias.

    python -m train.evaluate --reward_model_path RUN/FINAL                      # the run's own held-out pairs
    python -m train.evaluate --reward_model_path RUN/checkpoints/step-512 datasets=[jsonl] \\
        ++datasets.jsonl.path=train.jsonl ++datasets.jsonl.test_path=test.jsonl model.max_length=512
    python -m train.evaluate --reward_model_path RUN/FINAL --data pairs.jsonl  # every pair of one file
    accelerate launch --config_file accelerate_config/ddp_cpu_2proc.yaml -m train.evaluate ...

1. The data config is training's: overrides are composed with config/ by Hydra, exactly as
   launch.py takes them. Without a `datasets=` choice on the command line, the run's own data config
   (<run>/config.yaml) is used, with any `datasets.<name>.<key>=` overrides applied to it. The pairs
   are read by train.data.loader.load_examples and tokenised by its tokenize() with the run's
   max_length, max_prompt_length and truncation (model.* overrides win), so a pair is scored
   exactly as training's eval scored it.
2. The model is a run's FINAL dir, one of its checkpoints (rebuilt from <run>/config.yaml) or a
   plain classifier dir, loaded by train.labeling.scoring.load_reward_model as train.label loads it.
3. Each process scores every W-th pair, in length-sorted batches; the main process gathers the
   scores, computes the report (train/report.py) and writes the JSON and its PNGs atomically.
"""
import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from train import report
from train.checks import check_ranges
from train.config import RANGES, check_model_choices, check_overrides, register
from train.data.options import checked_source_options
from train.errors import UserError, exit_with_error, leave, storage_error
from train.model_files import model_kind, run_config, settings

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "config")
DEFAULT_OUT_DIR = "eval-report"  # in the current directory: the model's dir may be read-only
MODEL_KEYS = ("model.max_length", "model.max_prompt_length", "model.truncation", "model.dtype")
OTHER_KEYS = ("seed", "cache_dir", "n_eval_examples")  # the run's seed, the tokenised cache, --eval_subset
SPLITS = ("test", "train", "all")
SPLIT_NAMES = {"test": "held-out", "train": "training", "all": ""}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra-style overrides as launch.py takes them: datasets=[jsonl] "
                        "++datasets.jsonl.path=FILE, model.max_length=512, model.max_prompt_length, "
                        "model.truncation, model.dtype, seed, cache_dir (where "
                        "tokenised pairs are cached), n_eval_examples (with --eval_subset)")
    p.add_argument("--reward_model_path", required=True,
                   help="a run's FINAL dir, a checkpoint dir (RUN/checkpoints/step-N) or an HF classifier dir")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="shortcut for datasets=[jsonl] ++datasets.jsonl.path=FILE; the default split is then "
                        "'all' (every pair of the file)")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="which pairs of the data config: test (held-out, the default), train, or all")
    p.add_argument("--eval_subset", action="store_true",
                   help="only the fixed subset of n_eval_examples held-out pairs that training's evals "
                        "score (as FINAL/eval_report.json does), instead of every held-out pair")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help=f"the report; its PNGs go beside it. Default: ./{DEFAULT_OUT_DIR}/<run>-<model>-<data>-<split>/"
                        f"{report.REPORT_NAME}.json")
    p.add_argument("--batch_size", type=int, default=32, help="pairs per forward per process")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="run Python code shipped with the model or tokenizer (auto_map); never taken "
                        "from the run's config.yaml")
    return p.parse_intermixed_args(argv)  # overrides may come before, between or after the options


# ---- config ---------------------------------------------------------------------------------------
def parse_overrides(args) -> tuple:
    """(override strings, parsed Hydra overrides), --data expanded; one line for anything that is not
    a data or formatting override, for a misspelled key (train.config.check_overrides) or a sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    strings = list(args.overrides)
    for arg in strings:
        if "=" not in arg:
            raise UserError(f"unexpected argument '{arg}': overrides are KEY=VALUE, e.g. datasets=[jsonl]")
    if args.data is not None:
        if not os.path.isfile(args.data):
            raise UserError(f"--data {args.data}: no such file")
        for arg in strings:  # its other options (test_path, on_error...) may be set
            key = _key(arg)
            if key in ("datasets", "datasets.jsonl.path") or key.startswith("datasets.") and \
                    not key.startswith("datasets.jsonl."):
                raise UserError(f"'{arg}': --data FILE is a shortcut for datasets=[jsonl] "
                                "++datasets.jsonl.path=FILE: pass one or the other")
        strings = ["datasets=[jsonl]", f"++datasets.jsonl.path={_quoted(args.data)}", *strings]
    # unknown keys (with a suggestion), group choices and types: one line
    check_overrides(strings, datasets_selected=False)
    parsed = OverridesParser.create().parse_overrides(strings)
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():
            raise UserError(f"'{override.input_line}': python -m train.evaluate takes one value per key, not a sweep")
        if not (key == "datasets" or key.startswith("datasets.") or key in MODEL_KEYS or key in OTHER_KEYS):
            raise UserError(f"'{override.input_line}': python -m train.evaluate takes only data overrides "
                            f"(datasets=..., datasets.<name>.<key>=...), {', '.join(MODEL_KEYS)} and "
                            f"{', '.join(OTHER_KEYS)}; the model is --reward_model_path")
    return strings, parsed


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _quoted(value: str) -> str:
    """A path as a Hydra override value: quoted, so that characters such as , [ ] = stay literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def data_config(strings: list, parsed: list, run_cfg):
    """The data part of a run config: datasets, seed, cache_dir and n_eval_examples.

    With a `datasets=` choice on the command line the data config is composed from config/ exactly
    as launch.py composes it. Without one it is the run's (<run>/config.yaml), with the command
    line's `datasets.<name>.<key>=` overrides applied. seed and n_eval_examples are the run's
    unless overridden, so load_examples sees the config training gave it."""
    from hydra import compose, initialize_config_dir

    given = {o.key_or_group for o in parsed}
    from_run = run_cfg is not None and "datasets" not in given
    base = [f"datasets=[{','.join(run_cfg.datasets)}]"] if from_run else []
    choice = next((o.value() for o in parsed if o.key_or_group == "datasets"), None)
    if from_run:
        selected = list(run_cfg.datasets)
    else:  # the choice on the command line, else config.yaml's default
        defaults = OmegaConf.load(os.path.join(CONFIG_DIR, "config.yaml")).defaults
        default = next((d.datasets for d in defaults if OmegaConf.is_dict(d) and "datasets" in d), [])
        selected = list(choice if isinstance(choice, list) else [choice] if choice else default)
    for override in parsed:
        parts = override.key_or_group.split(".")
        if parts[0] == "datasets" and len(parts) > 1 and parts[1] not in selected:
            where = "the run's data config" if from_run else "the data config"
            raise UserError(f"'{override.input_line}': datasets.{parts[1]} is not in {where} "
                            f"(datasets=[{','.join(map(str, selected))}]); select it with datasets=[...]")
    register()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose("config", overrides=[*base, *strings])
    except Exception as err:  # Hydra's own errors (a key missing from a source's YAML without ++, ...)
        raise UserError("; ".join(str(err).splitlines())) from None
    if from_run:
        datasets = OmegaConf.create(OmegaConf.to_container(run_cfg.datasets, resolve=True))
        for override in parsed:
            if override.key_or_group.startswith("datasets.") and not override.is_delete():
                key = override.key_or_group[len("datasets."):]
                OmegaConf.update(datasets, key, OmegaConf.select(cfg.datasets, key), force_add=True)
        cfg.datasets = datasets
    for key in ("seed", "n_eval_examples"):
        if run_cfg is not None and key not in given and OmegaConf.select(run_cfg, key) is not None:
            cfg[key] = run_cfg[key]
    if not cfg.datasets:
        raise UserError("no dataset selected: pass datasets=[synthetic], datasets=[jsonl] ... or --data FILE")
    for name, options in cfg.datasets.items():
        checked_source_options(name, options)
    check_ranges(cfg, {"n_eval_examples": RANGES["n_eval_examples"]})
    return cfg


def model_setup(path: str, parsed: list) -> dict:
    """Formatting and dtype: the run's (train.model_files.settings), model.* overrides winning."""
    given = {o.key_or_group: o.value() for o in parsed if o.key_or_group in MODEL_KEYS}
    overridden = OmegaConf.create({"model": {k[len("model."):]: v for k, v in given.items()}})
    check_ranges(overridden, {k: RANGES[k] for k in ("model.max_length", "model.max_prompt_length")})  # training's bounds
    check_model_choices(overridden.model)  # training's choices
    overrides = {k: given.get(f"model.{k}") for k in ("max_length", "max_prompt_length", "dtype")}
    setup = settings(path, SimpleNamespace(**overrides))
    if "model.truncation" in given:
        setup["truncation"] = given["model.truncation"]
    return setup


def check_model_path(path: str):
    """A local dir, or something that can only be a hub id ('org/name'); else one line."""
    if os.path.isdir(path):
        model_kind(path)  # neither a FINAL/classifier dir nor a checkpoint dir: one line
        return
    if os.path.exists(path):
        raise UserError(f"--reward_model_path {path}: not a directory")
    looks_like_hub_id = not os.path.isabs(path) and not path.startswith((".", "~")) and path.count("/") == 1
    if not looks_like_hub_id:
        raise UserError(f"--reward_model_path {path}: no such directory")


# ---- output ---------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("_") or "model"


def default_out(path: str, cfg, split: str, eval_subset: bool, model_overrides: tuple = ()) -> str:
    """./eval-report/<run>-<FINAL|step-N>-<data>-<split>[-<model.* overrides>]/eval_report.json: a
    rerun with another max_length, say, does not replace the first report."""
    path = os.path.normpath(os.path.abspath(path))
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints":
        model = f"{os.path.basename(os.path.dirname(parent))}-{os.path.basename(path)}"
    elif os.path.basename(path) == "FINAL":
        model = f"{os.path.basename(parent)}-FINAL"
    else:
        model = os.path.basename(path)
    data = "+".join(Path(str(options.get("test_path") if split == "test" and options.get("test_path")
                             else options.get("path"))).stem if options.get("path") else name
                    for name, options in cfg.datasets.items())
    name = _slug("-".join([model, data, split, *(["eval_subset"] if eval_subset else []), *model_overrides]))
    return os.path.join(DEFAULT_OUT_DIR, name, f"{report.REPORT_NAME}.json")


def check_out(out: str) -> str:
    """The report path, its dir created; an error string (for every process) or None."""
    if os.path.isdir(out):
        return f"--out {out} is a directory: name a .json file"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except OSError as err:
        return storage_error(f"cannot create the report dir for {out}", err)
    try:  # a file made and removed: os.access says yes to root even where nothing can be written (/proc)
        tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(out))).close()
    except OSError as err:
        return storage_error(f"cannot write the report {out}", err)
    return None


def same_on_every_process(error):
    """The main process's error (or None) on every process, so all stop with the same line."""
    from accelerate.utils import broadcast_object_list

    message = [error]
    broadcast_object_list(message)
    if message[0]:
        raise UserError(message[0])


# ---- scoring --------------------------------------------------------------------------------------
def pick_examples(train: list, test: list, split: str) -> list:
    examples = {"test": test, "train": train, "all": train + test}[split]
    if not examples:
        raise UserError(f"the data config gives no {SPLIT_NAMES[split]} pairs to evaluate (--split {split})"
                        .replace("  ", " "))
    return examples


def score_pairs(model, tokenizer, ds, indices: list, accelerator, batch_size: int) -> list:
    """This process's share (every W-th of `indices`) as report pairs: scores, source, subset, lengths."""
    import torch

    from train.data.batching import model_inputs
    from train.data.loader import Collator, select

    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    rows = select(ds, indices[rank::world])
    rows.sort(key=lambda r: -len(r["chosen_ids"]) - len(r["rejected_ids"]))  # minimal padding
    collate = Collator(tokenizer.pad_token_id, model.enable_packing(), share_prompt=True)  # as training packs
    model = model.to(device)
    bar = tqdm(total=len(indices), desc="scoring", unit="pair", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    pairs = []
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        batch = collate(part)
        with torch.inference_mode():
            scores = model(**model_inputs(batch, device)).float().tolist()
        for j, row in enumerate(part):
            chosen_len, rejected_len = report.response_lengths(row["chosen_ids"], row["rejected_ids"])
            pairs.append({"index": row["index"], "source": row.get("source", ""), "subset": row["subset"],
                          "chosen": scores[j], "rejected": scores[len(part) + j],
                          "chosen_len": chosen_len, "rejected_len": rejected_len})
        bar.update(min(len(part) * world, bar.total - bar.n))  # the other processes keep the same pace
    bar.close()
    return pairs


def evaluate(args) -> dict:
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    split = args.split or ("all" if args.data is not None else "test")
    if args.eval_subset and split != "test":
        raise UserError(f"--eval_subset picks held-out pairs: it needs --split test, not {split}")
    path = args.reward_model_path
    check_model_path(path)
    strings, parsed = parse_overrides(args)
    cfg = data_config(strings, parsed, run_config(path))
    setup = model_setup(path, parsed)
    tweaks = sorted(f"{o.key_or_group[len('model.'):]}={o.value()}" for o in parsed if o.key_or_group in MODEL_KEYS)
    out = args.out or default_out(path, cfg, split, args.eval_subset, tweaks)
    # Imported only now: torch, transformers and datasets take about 9 s, and a mistake in the
    # arguments, the overrides or the model dir is reported before that.
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from train.build import fixed_eval_indices
    from train.data.loader import load_examples, tokenize
    from train.labeling.scoring import load_reward_model

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # else each CPU process is "rank 0 of 1"
    main = accelerator.is_main_process
    log = (lambda message: tqdm.write(str(message), file=sys.stderr)) if main else (lambda message: None)
    # Every process reads and checks the data, so a bad row stops them all with the same line.
    train, test = load_examples(cfg, log)
    examples = pick_examples(train, test, split)
    same_on_every_process(check_out(out) if main else None)
    model, tokenizer = load_reward_model(path, setup, args.trust_remote_code)
    model_cfg = OmegaConf.create({k: setup[k] for k in ("max_length", "max_prompt_length", "truncation")})
    with accelerator.main_process_first():  # tokenise once; the other processes read the cache
        ds, counts = tokenize(examples, tokenizer, model_cfg, os.path.join(cfg.cache_dir, "tokenized"))
    if len(ds) == 0:
        raise UserError(f"no pairs fit model.max_length={setup['max_length']} with truncation={setup['truncation']}")
    indices = fixed_eval_indices(len(ds), cfg.n_eval_examples) if args.eval_subset else list(range(len(ds)))
    which = (f"the fixed eval subset ({len(indices)} of {len(ds)} held-out pairs, n_eval_examples="
             f"{cfg.n_eval_examples})" if args.eval_subset else
             f"all {len(ds)} {'training and held-out' if split == 'all' else SPLIT_NAMES[split]} pairs")
    log(f"evaluating {path} on {which} with {accelerator.num_processes} process(es); max_length "
        f"{setup['max_length']}, max_prompt_length {setup['max_prompt_length']}, truncation {setup['truncation']}; "
        f"truncated/dropped/identical: {counts}")
    pairs = gather_object(score_pairs(model, tokenizer, ds, indices, accelerator, args.batch_size))
    result, error = None, None
    if main:
        pairs.sort(key=lambda p: p["index"])
        about = {"model": os.path.abspath(path), "split": split, "pairs": which,
                 "datasets": OmegaConf.to_container(cfg.datasets, resolve=True), "seed": cfg.seed,
                 "formatting": {k: setup[k] for k in ("max_length", "max_prompt_length", "truncation", "dtype")},
                 **{f"data_{k}": v for k, v in counts.items()}, "world_size": accelerator.num_processes}
        result = {**about, **report.preference_report(pairs)}
        try:
            report.write_report(out, result, pairs)
        except OSError as err:
            error = storage_error(f"cannot write the report {out}", err)
    same_on_every_process(error)
    if main:
        print(report.format_table(result))
        paths = report.png_paths(out)
        print(f"wrote {out} ({paths['reliability']}, {paths['reward_hist']}); {len(pairs)} pairs scored by "
              f"{accelerator.num_processes} process(es)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def main(argv=None):
    try:
        evaluate(parse_args(argv))
    except UserError as err:
        exit_with_error(err)


if __name__ == "__main__":
    main()
    leave(0)  # a distributed process ends at once (train/errors.py)
