"""Where rows come from: a local file, a save_to_disk dir, or a hub dataset -> numbered rows.

Parquet, CSV/TSV, save_to_disk dirs and hub datasets are read by `datasets` (load_dataset /
load_from_disk, with its cache). JSON and JSONL (also compressed) go through train.data.jsonfile,
the reader label samples use too: pyarrow, under datasets' json builder, kills the process with a
segmentation fault on a deeply nested row, and names no row for bytes that are not UTF-8; this
reader names the row in one line for both and streams a JSON array instead of loading it whole.

Rows are numbered from 1 (for JSONL: the line), so an error names file, row and field.
"""
import contextlib
import json
import os
from typing import Iterator, Tuple

import datasets

from train.data.jsonfile import read_rows
from train.errors import UserError

COMPRESSIONS = (".gz", ".bz2", ".xz")
BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}


def file_type(path: str) -> str:
    """The suffix that tells a file's layout, under any compression suffix: data.jsonl.gz -> .jsonl"""
    stem, suffix = os.path.splitext(path.lower())
    if suffix in COMPRESSIONS:
        stem, suffix = os.path.splitext(stem)
    return suffix


@contextlib.contextmanager
def _quiet():
    """No datasets progress bars while a local file is read (a bar per small file is noise); the
    setting is restored after, so tokenizing and hub downloads keep theirs."""
    from datasets.utils import logging as ds_logging
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            ds_logging.enable_progress_bar()


def _numbered(ds) -> Iterator[Tuple[int, dict]]:
    return enumerate(ds, start=1)


def read_path(path: str, split: str = "train", layout: str = None) -> Iterator[Tuple[int, object]]:
    """Numbered rows of a local file or save_to_disk dir (its `split`, when it holds several)."""
    if os.path.isdir(path):
        return _numbered(_disk_split(path, split))
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    if layout == "chitchat":
        return _numbered(chitchat_rows(path))
    kind = file_type(path)
    if kind in (".json", ".jsonl"):
        return read_rows(path)
    if kind not in BUILDERS:
        raise UserError(f"{path}: unknown file type '{kind or os.path.basename(path)}': expected .jsonl, .json, "
                        f".parquet, .csv or .tsv (optionally {', '.join(COMPRESSIONS)}), or a save_to_disk dir")
    extra = {"delimiter": "\t"} if kind == ".tsv" else {}
    try:
        with _quiet():
            ds = datasets.load_dataset(BUILDERS[kind], data_files=os.path.abspath(path), split="train", **extra)
    except Exception as err:  # pyarrow's and pandas' errors: the first line says what is wrong
        raise UserError(f"{path}: cannot read as {kind[1:]}: {_first_line(err)}")
    return _numbered(ds)


def has_splits(path: str) -> bool:
    """A save_to_disk dir of a DatasetDict (named splits), as opposed to a file or one Dataset."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _disk_split(path: str, split: str):
    try:
        with _quiet():
            data = datasets.load_from_disk(path)
    except Exception as err:
        raise UserError(f"{path}: not a dir written by datasets' save_to_disk: {_first_line(err)}")
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UserError(f"{path}: no split '{split}' (it has: {', '.join(data)})")
        return data[split]
    return data


def read_hub(hub: str, name, data_dir, revision, split: str) -> Iterator[Tuple[int, dict]]:
    """Numbered rows of a hub dataset split, from the local HF cache (or the hub when online)."""
    where = hub + (f" ({name})" if name else "") + (f" data_dir {data_dir}" if data_dir else "")
    try:
        ds = datasets.load_dataset(hub, name, data_dir=data_dir, revision=revision, split=split)
    except ValueError as err:  # e.g. an unknown split: datasets says which exist
        raise UserError(f"{where}: {_first_line(err)}")
    except Exception as err:  # offline and not cached: ConnectionError, LocalEntryNotFoundError, ...
        raise UserError(f"{where} split {split} is not in the local HF cache and the hub cannot be reached "
                        f"({_first_line(err)}): download it where there is network (datasets.load_dataset) "
                        "and copy the HF cache here, or pass a local copy with ++datasets.<name>.path=FILE")
    return _numbered(ds)


def chitchat_rows(path: str) -> list:
    """The chitchat-dataset (PyPI) file -> one scored row per rated chat: the shared starter prompt,
    the chat as text ("A: ..." / "B: ..." lines), and the mean of its 1-10 human ratings.
    Chats without a prompt or ratings give rows without them, which the scored format counts."""
    try:
        with open(path, encoding="utf-8") as f:
            chats = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the chitchat file: {err}")
    if not isinstance(chats, dict):
        raise UserError(f"{path}: expected the chitchat-dataset layout (an object of chats by id)")
    rows = []
    for chat_id, chat in chats.items():
        speakers, lines = {}, []
        for message in chat.get("messages") or []:
            if not message:
                continue
            who = speakers.setdefault(message[0].get("sender"), "AB"[len(speakers) % 2])
            lines.append(f"{who}: " + " ".join(m.get("text", "") for m in message))
        ratings = chat.get("ratings") or {}
        scores = [v for v in ratings.values() if isinstance(v, (int, float))]
        rows.append({"id": chat_id, "prompt": chat.get("prompt"), "response": "\n".join(lines),
                     "score": sum(scores) / len(scores) if scores else None})
    return rows


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
