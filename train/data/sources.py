"""Dataset sources: each turns its config into (train, test) lists of PreferenceExample.

A data source (every config/datasets YAML but synthetic) reads a local file or dir, or a hub
dataset (train.data.tables), parses each row in its format (train.data.formats), splits off the
held-out part, and applies the source's weight and cap. Every row is checked; a bad row is one line
naming file, row and field (UserError), or is skipped and counted when the source sets
on_error: skip. Rows that give no pair by a policy (divergent prompts, tied scores, a low SHP score
ratio) are counted per reason, logged, and reported in the run's metrics.
"""
import random
from collections import Counter

from train.data.example import PreferenceExample
from train.data.formats import Scored, Skip, group_key, make_pairs, parse_row, rename_columns
from train.data.jsonfile import RowError
from train.data.options import DataSource
from train.data.tables import has_splits, read_hub, read_path
from train.errors import UserError

# The held-out part of a source without a test split is drawn with this seed, not the training
# seed, so the jobs of a seed sweep are all scored on the same held-out pairs.
SPLIT_SEED = 0


def preference_row(row) -> PreferenceExample:
    """A {prompt, chosen, rejected[, margin, subset]} row -> PreferenceExample (format standard)."""
    (example,) = parse_row(row, "standard", "default", None)
    return example


def read_file(path: str, format_name: str = "auto", on_error: str = "raise", log=print) -> list:
    """All good rows of one local file in a format, read and checked exactly as a data source reads
    them (parse_rows); bad rows raise one-line UserErrors or are skipped and counted."""
    options = DataSource(path=path, format=format_name, on_error=on_error)
    counts = Counter()
    units = parse_rows(path, read_path(path, layout=format_name), "default", options, counts)
    if counts["skipped_bad_rows"]:
        log(f"{path}: skipped {counts['skipped_bad_rows']} bad rows (on_error=skip)")
    examples = [e for unit in units.get(None, []) for e in unit]
    if not examples:
        raise UserError(f"{path}: no usable rows")
    return examples


def parse_rows(where: str, rows, subset: str, options, counts: Counter) -> dict:
    """Numbered rows -> {split value (options.split_column) or None: [unit, ...]}, where a unit is
    the list of pairs of one row, or of one prompt for scored responses on rows of their own."""
    units, groups = {}, {}
    for number, row in rows:
        try:
            if isinstance(row, RowError):
                raise row
            row = rename_columns(row, options.columns)
            key = None
            if options.split_column:
                key = row.get(options.split_column) if isinstance(row, dict) else None
                if key not in (options.split, options.test_split):
                    raise RowError(f"field '{options.split_column}': expected '{options.split}' or "
                                   f"'{options.test_split}', got {key!r:.40}")
            out = parse_row(row, options.format, subset, options)
        except RowError as err:
            if options.on_error != "skip":
                raise UserError(f"{where}: row {number}: {err}")
            counts["skipped_bad_rows"] += 1
            continue
        if isinstance(out, Skip):
            counts[f"skipped_{out.reason}"] += 1
        elif isinstance(out, Scored):
            groups.setdefault((key, group_key(out.prompt)), []).append(out)
        else:
            units.setdefault(key, []).append(out)
    rng = random.Random(SPLIT_SEED)
    for (key, _), items in groups.items():
        pairs = make_pairs(items, options, rng)
        if pairs:
            units.setdefault(key, []).append(pairs)
        else:
            counts["skipped_no_pair"] += len(items)  # one response, or all tied / within min_score_gap
    return units


def data_source(name: str, options) -> tuple:
    """(train, test) pairs of one data source, and its counts of skipped rows by reason."""
    counts, subset = Counter(), options.subset or "default"
    parts = []  # (where, rows, subset, role): role is train, test or both (split below)
    if options.path:
        with_splits = options.test_split and has_splits(options.path)
        role = "train" if (options.test_path or with_splits) else "both"
        parts.append((options.path, read_path(options.path, options.split, options.format), subset, role))
        if with_splits and not options.test_path:
            parts.append((f"{options.path} split {options.test_split}",
                          read_path(options.path, options.test_split), subset, "test"))
    else:
        for data_dir in options.subsets or [None]:
            sub = data_dir if data_dir and not options.subset else subset
            where = options.hub + (f"/{data_dir}" if data_dir else "")
            role = "train" if (options.test_path or options.test_split and not options.split_column) else "both"
            parts.append((f"{where} split {options.split}",
                          read_hub(options.hub, options.name, data_dir, options.revision, options.split), sub, role))
            if role == "train" and not options.test_path:
                parts.append((f"{where} split {options.test_split}",
                              read_hub(options.hub, options.name, data_dir, options.revision, options.test_split),
                              sub, "test"))
    if options.test_path:
        parts.append((options.test_path, read_path(options.test_path, layout=options.format), subset, "test"))
    train, test, pooled = [], [], []
    for where, rows, sub, role in parts:
        units = parse_rows(where, rows, sub, options, counts)
        if options.split_column:
            train += units.get(options.split, [])
            test += units.get(options.test_split, [])
        else:
            {"train": train, "test": test, "both": pooled}[role].extend(units.get(None, []))
    if pooled:
        if not 0 < options.test_fraction < 1 and not test:
            raise UserError(f"datasets.{name}: test_fraction must be in (0, 1) without a test split or test_path, "
                            f"got {options.test_fraction}")
        held = held_out(len(pooled), options.test_fraction) if not test else set()
        train += [u for i, u in enumerate(pooled) if i not in held]
        test += [u for i, u in enumerate(pooled) if i in held]
    train, test = [e for unit in train for e in unit], [e for unit in test for e in unit]
    if not train and not test:
        raise UserError(f"datasets.{name}: no usable rows in {', '.join(p[0] for p in parts)}")
    return reweigh(train, options.weight, options.max_examples), test, dict(counts)


def held_out(n_units: int, fraction: float) -> set:
    """The seeded held-out units: whole rows, or whole prompts for scored responses."""
    order = list(range(n_units))
    random.Random(SPLIT_SEED).shuffle(order)
    return set(order[:max(1, int(n_units * fraction))])


def reweigh(examples: list, weight: float, cap) -> list:
    """weight x the pairs (whole copies, plus a seeded sample for the fraction), then at most cap."""
    n = round(weight * len(examples))
    if cap is not None:
        n = min(n, cap)
    if n == len(examples) or not examples:
        return examples
    rng = random.Random(SPLIT_SEED)
    copies, rest = divmod(n, len(examples))
    return examples * copies + [examples[i] for i in sorted(rng.sample(range(len(examples)), rest))]


def synthetic_source(options) -> tuple:
    from train.data.synthetic import synthetic_examples
    subsets = list(options.subsets) if options.subsets else None
    try:
        return (synthetic_examples("train", options.n_train, options.seed, subsets),
                synthetic_examples("test", options.n_test, options.seed, subsets), {})
    except ValueError as err:
        raise UserError(f"datasets.synthetic: {err}")


def load_source(name: str, options) -> tuple:
    """(train, test, counts) of datasets.<name>, with its options already checked."""
    if name == "synthetic":
        return synthetic_source(options)
    return data_source(name, options)
