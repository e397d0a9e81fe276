"""Dataset sources: each turns its config into (train, test) lists of PreferenceExample.

Files are read by train.data.jsonfile (JSONL or a streamed JSON array, as label samples are).
Every row is checked; a bad row is one line naming file, row and field (UserError), or is skipped
and counted when the source sets on_error: skip. Rows are numbered from 1: the line of a JSONL
file, the element of a JSON array. A margin must lie within ±MAX_ABS_MARGIN.
"""
import random
import reprlib
from typing import Callable

from train.data.example import PreferenceExample
from train.data.jsonfile import RowError, read_rows
from train.errors import UserError

# Margins are in reward units, i.e. logits (the loss is -log σ(s_chosen - s_rejected - margin)): a
# margin of 20 already asks for a preference probability of 1 - 2e-9. Far larger values are mistakes,
# and beyond ~3e38 they overflow to inf in fp32 and stop training much later with a non-finite loss.
MAX_ABS_MARGIN = 1000


def text_field(row: dict, name: str) -> str:
    if name not in row:
        raise RowError(f"field '{name}': missing")
    value = row[name]
    if not isinstance(value, str):
        raise RowError(f"field '{name}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"field '{name}': empty text")
    return value


def prompt_field(row: dict, name: str = "prompt"):
    """A prompt is a non-empty string or a list of {role, content} turns with non-empty content."""
    value = row.get(name)
    if isinstance(value, list):
        if not value or not all(isinstance(t, dict) and isinstance(t.get("role"), str)
                                and isinstance(t.get("content"), str) for t in value):
            raise RowError(f"field '{name}': a list must hold {{role, content}} turns of strings")
        for number, turn in enumerate(value, start=1):  # the rule for a prompt string, per turn
            if not turn["content"].strip():
                raise RowError(f"field '{name}': turn {number} has empty content")
        return value
    return text_field(row, name)


def preference_row(row) -> PreferenceExample:
    """{prompt, chosen, rejected[, margin, subset]} -> PreferenceExample."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    prompt, chosen, rejected = prompt_field(row), text_field(row, "chosen"), text_field(row, "rejected")
    if chosen == rejected:
        raise RowError("field 'rejected': identical to 'chosen'")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise RowError(f"field 'margin': expected a number, got {type(margin).__name__}")
    if margin is not None and not abs(margin) <= MAX_ABS_MARGIN:  # also NaN and Infinity, which json reads
        raise RowError(f"field 'margin': expected a number from -{MAX_ABS_MARGIN} to {MAX_ABS_MARGIN} "
                       f"(reward units), got {reprlib.repr(margin)}")
    subset = row.get("subset", "default")
    if not isinstance(subset, str):
        raise RowError(f"field 'subset': expected a string, got {type(subset).__name__}")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "margin", "subset")}
    return PreferenceExample(prompt, chosen, rejected, None if margin is None else float(margin), subset, extra)


def feedback_row(row) -> PreferenceExample:
    """A pairwise_feedback row written by `python -m train.label` -> PreferenceExample."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    if row.get("type") != "pairwise_feedback":
        raise RowError(f"field 'type': expected 'pairwise_feedback', got {row.get('type')!r} "
                       "(train on pairwise feedback; binary/scalar files have no pairs)")
    prompt, a, b = prompt_field(row), text_field(row, "output_A"), text_field(row, "output_B")
    label = row.get("label")
    if label not in (0, 1) or isinstance(label, bool):
        raise RowError(f"field 'label': expected 0 or 1, got {label!r}")
    if a == b:
        raise RowError("field 'output_B': identical to 'output_A'")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    extra = {k: row[k] for k in ("prompt_id", "reward_difference") if k in row}
    return PreferenceExample(prompt, chosen, rejected, None, "feedback", extra)


def read_file(path: str, parse: Callable, on_error: str, log=print) -> list:
    """All good rows of a file; bad rows raise one-line UserErrors or are skipped and counted."""
    examples, skipped = [], 0
    for number, row in read_rows(path):
        try:
            if isinstance(row, RowError):
                raise row
            examples.append(parse(row))
        except RowError as err:
            if on_error != "skip":
                raise UserError(f"{path}: row {number}: {err}")
            skipped += 1
    if skipped:
        log(f"{path}: skipped {skipped} bad rows (on_error=skip)")
    if not examples:
        raise UserError(f"{path}: no usable rows")
    return examples


def file_source(options, parse: Callable, seed: int, log=print) -> tuple:
    if options.on_error not in ("raise", "skip"):
        raise UserError(f"on_error must be 'raise' or 'skip', got '{options.on_error}'")
    train = read_file(options.path, parse, options.on_error, log)
    if options.test_path:
        return train, read_file(options.test_path, parse, options.on_error, log)
    if not 0 < options.test_fraction < 1:
        raise UserError(f"test_fraction must be in (0, 1) without a test_path, got {options.test_fraction}")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)  # a seeded split: the same held-out rows on every run
    n_test = max(1, int(len(train) * options.test_fraction))
    test_ids = set(order[:n_test])
    return ([e for i, e in enumerate(train) if i not in test_ids],
            [e for i, e in enumerate(train) if i in test_ids])


def synthetic_source(options, seed: int, log=print) -> tuple:
    from train.data.synthetic import synthetic_examples
    subsets = list(options.subsets) if options.subsets else None
    try:
        return (synthetic_examples("train", options.n_train, options.seed, subsets),
                synthetic_examples("test", options.n_test, options.seed, subsets))
    except ValueError as err:
        raise UserError(f"datasets.synthetic: {err}")


SOURCES = {
    "synthetic": synthetic_source,
    "jsonl": lambda options, seed, log=print: file_source(options, preference_row, seed, log),
    "feedback": lambda options, seed, log=print: file_source(options, feedback_row, seed, log),
}
