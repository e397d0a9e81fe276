"""Reading sample files for labeling: checked rows, one at a time, JSONL or a JSON array.

Files are read by train.data.jsonfile, the reader of training data: no pass over a samples file
holds the file in memory, rows are numbered from 1 (the line of a JSONL file, the element of an
array) and a leading UTF-8 byte-order mark is skipped, as for training. The prompt is checked by
the same rule as a training prompt.
"""
import hashlib
import json
from typing import Iterator, Optional, Tuple

from train.data.jsonfile import RowError, read_rows
from train.data.formats import prompt_field, text_field
from train.errors import UserError


def read_samples(path: str, split: Optional[str] = None, need_prompt_id: bool = False,
                 splits: Optional[set] = None) -> Iterator[Tuple[int, dict]]:
    """(row number, sample) for each sample to label; a bad row raises one UserError line.

    A sample is {prompt (text or {role, content} turns), output (non-empty text), prompt_id, ...};
    other fields are carried through. With `split`, samples whose `split` field differs are
    skipped. prompt_id must have one type in the whole file: 1 and "1" would silently be two
    prompts when grouping pairs.

    need_prompt_id (pairwise feedback): every sample has a prompt_id, and the samples labelled
    under one prompt_id have one prompt, since a pair is written with one prompt for its two
    outputs. Only a digest of each prompt_id's prompt is kept, not its text. splits: a set that
    collects each row's `split` field as JSON text, so the caller can name the splits there are.
    """
    id_type = None  # (type name, first row with it)
    prompts = {}  # need_prompt_id: prompt_id -> (digest of its prompt, first row with it)
    for number, row in read_rows(path):
        try:
            if isinstance(row, RowError):
                raise row
            if not isinstance(row, dict):
                raise RowError(f"expected a JSON object, got {type(row).__name__}")
            prompt_field(row)
            text_field(row, "output")
            if "prompt_id" in row:
                pid = row["prompt_id"]
                if isinstance(pid, bool) or not isinstance(pid, (str, int)):
                    raise RowError(f"field 'prompt_id': expected a string or an integer, got {type(pid).__name__}")
                if id_type is None:
                    id_type = (type(pid).__name__, number)
                elif type(pid).__name__ != id_type[0]:
                    raise RowError(f"field 'prompt_id': mixed types: {type(pid).__name__} here, "
                                   f"{id_type[0]} in row {id_type[1]}")
            elif need_prompt_id:
                raise RowError("field 'prompt_id': missing (pairwise feedback pairs samples of one prompt)")
            if splits is not None and "split" in row:
                splits.add(json.dumps(row["split"]))
            if split is not None and row.get("split", split) != split:
                continue
            if need_prompt_id:  # else answers to two questions would be paired under the first one
                digest = hashlib.blake2b(json.dumps(row["prompt"], sort_keys=True).encode(), digest_size=16).digest()
                first = prompts.setdefault(row["prompt_id"], (digest, number))
                if first[0] != digest:
                    raise RowError(f"field 'prompt': differs from row {first[1]}'s prompt of the same "
                                   f"prompt_id {row['prompt_id']!r}")
        except RowError as err:
            raise UserError(f"{path}: row {number}: {err}")
        yield number, row
