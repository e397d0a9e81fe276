"""JSON rows from a file, JSONL or a JSON array: the one reader of training data and label samples.

Rows are numbered from 1: the line of a JSONL file, the element of a JSON array. Neither kind is
ever held whole in memory: JSONL is read line by line, and a JSON array is decoded one element at
a time from 1 MB reads. A leading UTF-8 byte-order mark (as some Windows editors write) is skipped.

A bad JSONL line is yielded as a RowError, so the caller can name it or skip it. In a JSON array,
bad JSON or bytes that are not UTF-8 stop the read with a UserError naming the element, since the
elements after it cannot be found reliably.
"""
import bz2
import codecs
import gzip
import json
import lzma
from typing import Iterator, Tuple

from train.errors import UserError

# Rows deeper than this are refused. Real rows nest a few levels; far deeper ones would overflow
# Python's recursion limit later, when the rows are hashed for the tokenised-data cache (~200
# levels) or when json parses them (~1000 levels), and end in a traceback.
MAX_DEPTH = 100
TOO_DEEP = f"not valid JSON (nested too deeply: more than {MAX_DEPTH} levels)"


# Compressed files are read through the matching stdlib opener, told by their first bytes.
MAGIC = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}


def open_bytes(path: str):
    """A binary file object of the file's content, decompressed if it is gzip, bz2 or xz."""
    with open(path, "rb") as f:
        head = f.read(6)
    opener = next((o for magic, o in MAGIC.items() if head.startswith(magic)), open)
    return opener(path, "rb")


class RowError(ValueError):
    """A problem with one row: the message names the field."""


def is_json_array(path: str) -> bool:
    """A JSON array (else JSONL), told by its first non-blank byte; an unreadable file is one line."""
    try:
        with open_bytes(path) as f:
            return f.read(1024).removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise UserError(f"{path}: cannot read: {getattr(err, 'strerror', None) or err}")


def too_deep(value, text, start: int = 0, end: int = None) -> bool:
    """More than MAX_DEPTH levels of lists and objects in value, parsed from text[start:end].

    Only a text with more brackets than that can be so deep: counting them is the quick test that
    nearly every row stops at. Then the levels are walked one by one, so without recursion.
    """
    opening = ("[", "{") if isinstance(text, str) else (b"[", b"{")
    if sum(text.count(c, start, end) for c in opening) <= MAX_DEPTH:
        return False
    level = [value] if isinstance(value, (list, dict)) else []  # the lists and objects at one depth
    for _ in range(MAX_DEPTH):
        if not level:
            return False
        level = [child for v in level for child in (v.values() if isinstance(v, dict) else v)
                 if isinstance(child, (list, dict))]
    return bool(level)


def parse_line(line: bytes):
    """One JSONL line -> its value, or a RowError saying why it is not one."""
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return RowError("bytes that are not UTF-8")
    except RecursionError:
        return RowError(TOO_DEEP)
    except ValueError as err:  # JSONDecodeError, or an integer of more than 4300 digits
        return RowError(f"not valid JSON ({getattr(err, 'msg', err)})")
    return RowError(TOO_DEEP) if too_deep(value, line) else value


def iter_json_array(path: str, chunk_chars: int = 1 << 20) -> Iterator[Tuple[int, object]]:
    """(element number, value or RowError) of a JSON array, one element at a time.

    Reads chunk_chars bytes at a time, more while one element is longer than that (so a long
    element costs linear time, not one decode attempt per chunk).
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()  # keeps a character split between two reads
    with open_bytes(path) as f:
        buf, pos, eof, undecodable, number = "", 0, False, False, 0

        def fail(reason: str):
            raise UserError(f"{path}: row {number + 1}: {reason}")

        def fill() -> bool:  # more text, dropping what has been consumed; False at the end of the file
            nonlocal buf, pos, eof, undecodable
            if undecodable:  # the text before the bad bytes is used up
                fail("bytes that are not UTF-8")
            more = ""
            while not more and not eof:
                data = f.read(max(chunk_chars, len(buf) - pos))
                try:
                    more = utf8.decode(data, final=not data)
                    eof = not data
                except UnicodeDecodeError as err:  # keep the good text before the bad bytes
                    more, undecodable = err.object[:err.start].decode("utf-8"), True
                    break
            buf, pos = buf[pos:] + more, 0
            return not eof

        def next_char() -> str:  # the next non-blank character, not consumed; "" at the end
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos].isspace():
                    pos += 1
                if pos < len(buf) or not fill():
                    return buf[pos] if pos < len(buf) else ""

        if next_char() == "\ufeff":  # a byte-order mark
            pos += 1
        if next_char() != "[":
            fail("not valid JSON (expected '[')")
        pos += 1
        while True:
            c = next_char()
            if c == "]":
                pos += 1
                if next_char():
                    fail("not valid JSON (text after the closing ']')")
                return
            if number:
                if c != ",":
                    fail("not valid JSON (expected ',' or ']' between elements)")
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
                        fail(f"not valid JSON ({err.msg})")
                except RecursionError:  # too deep already in the text read so far
                    fail(TOO_DEEP)
                except ValueError as err:  # an integer of more than 4300 digits
                    fail(f"not valid JSON ({err})")
                fill()
            deep = too_deep(value, buf, pos, end)
            pos = end
            number += 1
            yield number, RowError(TOO_DEEP) if deep else value


def read_rows(path: str) -> Iterator[Tuple[int, object]]:
    """(row number, parsed JSON or a RowError) for a JSONL file or a JSON array, either of them
    possibly gzip, bz2 or xz compressed."""
    number = 0
    try:
        if is_json_array(path):
            for number, row in iter_json_array(path):
                yield number, row
            return
        with open_bytes(path) as f:
            for number, line in enumerate(f, start=1):
                if number == 1:
                    line = line.removeprefix(codecs.BOM_UTF8)
                if line.strip():
                    yield number, parse_line(line)
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError) as err:  # a damaged or cut compressed file
        raise UserError(f"{path}: row {number + 1}: cannot read: {getattr(err, 'strerror', None) or err}")
