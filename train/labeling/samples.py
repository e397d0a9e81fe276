"""Reading sample files for labeling: checked rows, one at a time, JSONL or a JSON array.

A JSON array is decoded element by element from 1 MB reads, so no pass over a samples file holds
the file in memory. Rows are numbered from 1 (the line of a JSONL file, the element of an array),
as the training data sources number them.
"""
import json
from typing import Iterator, Optional, Tuple

from train.data.sources import RowError, is_json_array, prompt_field, read_rows, text_field
from train.errors import UserError


def iter_json_array(path: str, chunk_chars: int = 1 << 20) -> Iterator[Tuple[int, object]]:
    """(element number, value) of a JSON array, decoded one element at a time from 1 MB reads."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof, number = "", 0, False, 0

        def fill():  # more text, dropping what has been consumed; False at the end of the file
            nonlocal buf, pos, eof
            more = f.read(chunk_chars)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            return bool(more)

        def next_char() -> str:  # the next non-blank character, not consumed; "" at the end
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos].isspace():
                    pos += 1
                if pos < len(buf) or not fill():
                    return buf[pos] if pos < len(buf) else ""

        def bad(what: str):
            raise UserError(f"{path}: row {number + 1}: not valid JSON ({what})")

        if next_char() != "[":
            bad("expected '['")
        pos += 1
        while True:
            c = next_char()
            if c == "]":
                pos += 1
                if next_char():
                    bad("text after the closing ']'")
                return
            if number:
                if c != ",":
                    bad("expected ',' or ']' between elements")
                pos += 1
                next_char()
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    # A value must be followed by a delimiter: "-5" may be the start of "-5.25".
                    if eof or (end < len(buf) and (buf[end].isspace() or buf[end] in ",]")):
                        break
                except json.JSONDecodeError as err:
                    if eof:
                        bad(err.msg)
                fill()
            pos = end
            number += 1
            yield number, value


def _rows(path: str) -> Iterator[Tuple[int, object]]:
    if is_json_array(path):  # streamed here: training's read_rows parses an array whole
        try:
            yield from iter_json_array(path)
        except UnicodeDecodeError:
            raise UserError(f"{path}: bytes that are not UTF-8")
    else:
        yield from read_rows(path)  # JSONL: already streamed, one line at a time


def read_samples(path: str, split: Optional[str] = None,
                 need_prompt_id: bool = False) -> Iterator[Tuple[int, dict]]:
    """(row number, sample) for each sample to label; a bad row raises one UserError line.

    A sample is {prompt (text or {role, content} turns), output (non-empty text), prompt_id, ...};
    other fields are carried through. With `split`, samples whose `split` field differs are
    skipped. prompt_id must have one type in the whole file: 1 and "1" would silently be two
    prompts when grouping pairs.
    """
    id_type = None  # (type name, first row with it)
    for number, row in _rows(path):
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
        except RowError as err:
            raise UserError(f"{path}: row {number}: {err}")
        if split is None or row.get("split", split) == split:
            yield number, row
