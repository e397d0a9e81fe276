"""The one record every data source produces."""
from dataclasses import dataclass, field
from typing import Optional, Union

# A prompt is plain text or a chat: a list of {"role": ..., "content": ...} turns.
Prompt = Union[str, list]


@dataclass
class PreferenceExample:
    prompt: Prompt
    chosen: str
    rejected: str
    margin: Optional[float] = None  # how much more chosen is preferred; None -> 0 in the loss
    subset: str = "default"  # used to report eval accuracy per subset
    source: str = ""  # the datasets.<name> it came from (set by load_examples), for per-source reports
    extra: dict = field(default_factory=dict)  # fields carried through untouched
