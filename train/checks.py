"""Small checks of config values shared by the config schema, the data sources and the losses.

Each turns a mistake into one UserError line; none of them imports anything higher up.
"""
import difflib
import math
from typing import Optional

from omegaconf import OmegaConf

from train.errors import UserError


def suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_type(dotted: str, ftype, value):
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


def check_ranges(cfg, ranges: dict, prefix: str = ""):
    """One line for the first value outside its range; None (an unset optional key) passes."""
    for key, (low, high) in ranges.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if not math.isfinite(value):
            raise UserError(f"{prefix}{key} must be a finite number, got {value}")
        below = value <= low[0] if isinstance(low, list) else low is not None and value < low
        above = value >= high[0] if isinstance(high, list) else high is not None and value > high
        if below or above:
            lo = "" if low is None else f"{'more than' if isinstance(low, list) else 'at least'} {bound_text(low)}"
            hi = "" if high is None else f"{'less than' if isinstance(high, list) else 'at most'} {bound_text(high)}"
            raise UserError(f"{prefix}{key} must be {' and '.join(p for p in (lo, hi) if p)}, got {value}")


def bound_text(bound) -> str:
    return str(bound[0] if isinstance(bound, list) else bound)
