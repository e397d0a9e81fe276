"""Row formats: one row of a preference file (any common layout) -> PreferenceExamples.

A source sets `format:` or leaves it `auto`, and then each row's format is told from its fields
(detect). A row that fits no format is one line naming its fields. The formats:

- standard        {prompt, chosen, rejected[, margin, subset]}, texts (TRL standard)
- conversational  prompt and chosen/rejected as {role, content} message lists (TRL conversational)
- implicit        chosen and rejected are whole transcripts sharing a prompt: message lists
                  (TRL implicit prompt, UltraFeedback-binarized) or HH-RLHF text with
                  "\\n\\nHuman:" / "\\n\\nAssistant:" turns
- sharegpt        LLaMA-Factory's {conversations: [{from, value}], chosen: {from, value}, rejected}
- feedback        HALOs pairwise feedback {prompt, output_A, output_B, label}, as train.label writes
- scored          {prompt, responses: [...], scores: [...]}, or one {prompt, response, score} row
                  per response: pairs are made per prompt under the source's pairs policy
- shp             Stanford SHP {history, human_ref_A, human_ref_B, labels, score_ratio, domain}
- helpsteer2      HelpSteer2 preference {prompt, response_1, response_2, preference_strength}

A parser returns a list of PreferenceExamples, a Scored response (grouped by prompt later), or a
Skip naming why the row gives no pair; skips are counted and reported, never silent.
"""
import json
import random
import re
from dataclasses import dataclass
from typing import Optional

from train.data.example import PreferenceExample
from train.checks import suggest
from train.data.jsonfile import RowError

# Margins are in reward units, i.e. logits (the loss is -log σ(s_chosen - s_rejected - margin)): a
# margin of 20 already asks for a preference probability of 1 - 2e-9. Far larger values are mistakes,
# and beyond ~3e38 they overflow to inf in fp32 and stop training much later with a non-finite loss.
MAX_ABS_MARGIN = 1000

# sharegpt speaker names -> chat roles (LLaMA-Factory writes human/gpt; some files use the role names).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
# The roles chat templates know (OpenAI's and the tool-calling ones).
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class Skip:
    reason: str  # counted per source and reason: divergent, empty_response, tie, score_ratio, identical


@dataclass
class Scored:
    prompt: object
    response: str
    score: float
    subset: str


def text_field(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        raise RowError(f"field '{name}': " + ("expected a string, got null" if name in row else "missing"))
    if not isinstance(value, str):
        raise RowError(f"field '{name}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"field '{name}': empty text")
    return value


def number_field(row: dict, name: str) -> float:
    value = row.get(name)
    if value is None:
        raise RowError(f"field '{name}': missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RowError(f"field '{name}': expected a number, got {value!r:.40}")
    return float(value)


def turns_field(row: dict, name: str) -> list:
    """A list of {role, content} turns of non-empty strings, with nothing else kept."""
    value = row.get(name)
    if not isinstance(value, list) or not value or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
            for t in value):
        raise RowError(f"field '{name}': a list must hold {{role, content}} turns of strings")
    for number, turn in enumerate(value, start=1):  # the rule for a prompt string, per turn
        if not turn["content"].strip():
            raise RowError(f"field '{name}': turn {number} has empty content")
        if turn["role"] not in ROLES:  # a misspelt role would be rendered as it is, silently
            raise RowError(f"field '{name}': turn {number} has role '{turn['role']}'{suggest(turn['role'], ROLES)}; "
                           f"expected one of {', '.join(ROLES)}")
    return [{"role": t["role"], "content": t["content"]} for t in value]


def prompt_field(row: dict, name: str = "prompt"):
    """A prompt is a non-empty string or a list of {role, content} turns with non-empty content."""
    return turns_field(row, name) if isinstance(row.get(name), list) else text_field(row, name)


def subset_field(row: dict, default: str) -> str:
    subset = row.get("subset")
    if subset is None:
        return default
    if not isinstance(subset, str):
        raise RowError(f"field 'subset': expected a string, got {type(subset).__name__}")
    return subset


def margin_field(row: dict) -> Optional[float]:
    margin = row.get("margin")
    if margin is None:
        return None
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise RowError(f"field 'margin': expected a number, got {type(margin).__name__}")
    if not abs(margin) <= MAX_ABS_MARGIN:  # also NaN and Infinity, which json reads
        raise RowError(f"field 'margin': expected a number from -{MAX_ABS_MARGIN} to {MAX_ABS_MARGIN} "
                       f"(reward units), got {margin!r:.40}")
    return float(margin)


def response_field(row: dict, name: str) -> str:
    """A response: a text, or (conversational) a list holding one assistant message."""
    value = row.get(name)
    if isinstance(value, list):
        turns = turns_field(row, name)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise RowError(f"field '{name}': expected one assistant message, got roles "
                           f"{[t['role'] for t in turns]}")
        return turns[0]["content"]
    return text_field(row, name)


def standard(row: dict, subset: str, options) -> list:
    """TRL standard or conversational: an explicit prompt and two responses."""
    prompt, chosen, rejected = prompt_field(row), response_field(row, "chosen"), response_field(row, "rejected")
    known = ("prompt", "chosen", "rejected", "margin", "subset")
    extra = {k: v for k, v in row.items() if k not in known and v is not None}
    return [PreferenceExample(prompt, chosen, rejected, margin_field(row), subset_field(row, subset), extra=extra)]


def hh_turns(row: dict, name: str) -> list:
    """HH-RLHF text ("\\n\\nHuman: ... \\n\\nAssistant: ...") -> turns."""
    text = text_field(row, name)
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowError(f"field '{name}': an implicit-prompt text must be turns that start with "
                       "'\\n\\nHuman:' or '\\n\\nAssistant:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])]


def implicit(row: dict, subset: str, options) -> list:
    """Two whole transcripts; the prompt is what comes before the last assistant turn of each."""
    sides = {}
    for name in ("chosen", "rejected"):
        turns = turns_field(row, name) if isinstance(row.get(name), list) else hh_turns(row, name)
        if turns[-1]["role"] != "assistant" or len(turns) < 2:
            raise RowError(f"field '{name}': expected a transcript that ends with an assistant turn")
        sides[name] = turns
    if not all(side[-1]["content"].strip() for side in sides.values()):
        return Skip("empty_response")  # HH has a few: the assistant said nothing
    chosen, rejected = sides["chosen"], sides["rejected"]
    if chosen[:-1] != rejected[:-1]:  # the two answers were given to different conversations
        if options.divergent == "raise":
            raise RowError("fields 'chosen' and 'rejected' differ before their last assistant turn "
                           "(datasets.<name>.divergent=skip skips and counts such rows)")
        return Skip("divergent")
    return [PreferenceExample(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"],
                              margin_field(row), subset_field(row, subset))]


def sharegpt(row: dict, subset: str, options) -> list:
    def turn(value, field):
        if not isinstance(value, dict) or not isinstance(value.get("value"), str):
            raise RowError(f"field '{field}': expected a {{from, value}} message")
        role = SHAREGPT_ROLES.get(value.get("from"))
        if role is None:
            raise RowError(f"field '{field}': unknown speaker {value.get('from')!r} "
                           f"(known: {', '.join(SHAREGPT_ROLES)})")
        if not value["value"].strip():
            raise RowError(f"field '{field}': empty text")
        return {"role": role, "content": value["value"]}

    conversation = row.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise RowError("field 'conversations': expected a list of {from, value} messages")
    prompt = [turn(t, f"conversations[{i}]") for i, t in enumerate(conversation)]
    if isinstance(row.get("system"), str) and row["system"].strip():
        prompt.insert(0, {"role": "system", "content": row["system"]})
    chosen, rejected = turn(row.get("chosen"), "chosen"), turn(row.get("rejected"), "rejected")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if side["role"] != "assistant":
            raise RowError(f"field '{name}': expected a message from gpt/assistant, got {side['role']}")
    return [PreferenceExample(prompt, chosen["content"], rejected["content"], None, subset_field(row, subset))]


def feedback(row: dict, subset: str, options) -> list:
    """HALOs pairwise feedback (as `python -m train.label --feedback_type pairwise` writes it)."""
    if row.get("type", "pairwise_feedback") != "pairwise_feedback":
        raise RowError(f"field 'type': expected 'pairwise_feedback', got {row.get('type')!r} "
                       "(train on pairwise feedback; binary/scalar files have no pairs)")
    prompt, a, b = prompt_field(row), text_field(row, "output_A"), text_field(row, "output_B")
    label = row.get("label")
    if label not in (0, 1) or isinstance(label, bool):
        raise RowError(f"field 'label': expected 0 or 1, got {label!r}")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    extra = {k: row[k] for k in ("prompt_id", "reward_difference") if row.get(k) is not None}
    return [PreferenceExample(prompt, chosen, rejected, None, subset_field(row, "feedback"), extra=extra)]


def scored(row: dict, subset: str, options):
    """Several scored responses in one row -> pairs now; one scored response -> grouped later."""
    prompt = prompt_field(row)
    if "responses" in row and row["responses"] is not None:
        responses, scores = row["responses"], row.get("scores")
        if not isinstance(responses, list) or not isinstance(scores, list) or len(responses) != len(scores):
            raise RowError("fields 'responses' and 'scores': expected two lists of the same length")
        items = [Scored(prompt, text_field({"responses": r}, "responses"),
                        number_field({"scores": s}, "scores"), subset_field(row, subset))
                 for r, s in zip(responses, scores)]
        return make_pairs(items, options) or Skip("tie")
    score_name = "score" if row.get("score") is not None else "rating"
    return Scored(prompt, text_field(row, "response"), number_field(row, score_name), subset_field(row, subset))


def make_pairs(items: list, options, rng=None) -> list:
    """Scored responses to one prompt -> pairs, by options.pairs:
    best_vs_worst: the highest against the lowest score; all: every two whose scores differ by at
    least options.min_score_gap (and by more than 0). At most options.max_pairs_per_prompt, sampled."""
    gap = max(options.min_score_gap, 0.0)
    ranked = sorted(items, key=lambda s: -s.score)
    if options.pairs == "best_vs_worst":
        candidates = [(ranked[0], ranked[-1])] if len(ranked) > 1 else []
    else:
        candidates = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]]
    pairs = [PreferenceExample(a.prompt, a.response, b.response, None, a.subset)
             for a, b in candidates if a.score - b.score > 0 and a.score - b.score >= gap]
    if options.max_pairs_per_prompt is not None and len(pairs) > options.max_pairs_per_prompt:
        keep = sorted((rng or random.Random(0)).sample(range(len(pairs)), options.max_pairs_per_prompt))
        pairs = [pairs[i] for i in keep]
    return pairs


def shp(row: dict, subset: str, options):
    if options.min_score_ratio is not None:
        ratio = number_field(row, "score_ratio")
        if ratio < options.min_score_ratio:
            return Skip("score_ratio")
    prompt, a, b = text_field(row, "history"), text_field(row, "human_ref_A"), text_field(row, "human_ref_B")
    label = row.get("labels")
    if label not in (0, 1) or isinstance(label, bool):
        raise RowError(f"field 'labels': expected 0 or 1, got {label!r}")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    domain = row.get("domain")
    return [PreferenceExample(prompt, chosen, rejected, None,
                              domain if isinstance(domain, str) and domain else subset)]


def helpsteer2(row: dict, subset: str, options):
    prompt, one, two = text_field(row, "prompt"), text_field(row, "response_1"), text_field(row, "response_2")
    strength = number_field(row, "preference_strength")  # -3..3; negative: response_1 is better
    if strength == 0:
        return Skip("tie")
    chosen, rejected = (one, two) if strength < 0 else (two, one)
    return [PreferenceExample(prompt, chosen, rejected, None, subset)]


FORMATS = {"standard": standard, "conversational": standard, "implicit": implicit, "sharegpt": sharegpt,
           "feedback": feedback, "scored": scored, "shp": shp, "helpsteer2": helpsteer2}
ALIASES = {"hh": "implicit", "ultrafeedback": "implicit", "chitchat": "scored"}
FORMAT_NAMES = ("auto", *FORMATS, *ALIASES)


def detect(row: dict) -> Optional[str]:
    """The format a row is in, told by its fields; None when it fits none."""
    has = {k for k, v in row.items() if v is not None}  # a column other rows have reads as None here
    if "conversations" in has:
        return "sharegpt"
    if {"output_A", "output_B"} <= has:
        return "feedback"
    if {"responses", "scores"} <= has or ("response" in has and has & {"score", "rating"}):
        return "scored"
    if "human_ref_A" in has:
        return "shp"
    if {"response_1", "response_2", "preference_strength"} <= has:
        return "helpsteer2"
    if {"chosen", "rejected"} <= has:
        chosen = row["chosen"]
        if "prompt" not in has:
            return "implicit"
        if isinstance(chosen, list) and chosen and isinstance(chosen[0], dict) and chosen[0].get("role") != "assistant":
            return "implicit"  # UltraFeedback-binarized: the message lists repeat the user turn
        return "standard"
    return None


def parse_row(row, format_name: str, subset: str, options):
    """One row -> [PreferenceExample...] | Scored | Skip; RowError for a bad row."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    name = ALIASES.get(format_name, format_name)
    if name == "auto":
        name = detect(row)
        if name is None:
            if "chosen" in row or "rejected" in row:  # a preference row with a field missing or null
                for field in ("chosen", "rejected"):
                    if row.get(field) is None:
                        text_field(row, field)  # its "missing" or "got null" line
            fields = ", ".join(sorted(row)) or "none"
            raise RowError(f"fits no known format (its fields: {fields}); set datasets.<name>.format and, "
                           "if the names differ, datasets.<name>.columns")
    parsed = FORMATS[name](row, subset, options)
    if isinstance(parsed, list) and parsed:
        # A pair of one text twice teaches nothing (its two rewards are equal whatever the weights):
        # skipped and counted, like the other rows that give no pair.
        parsed = [e for e in parsed if e.chosen != e.rejected] or Skip("identical")
    return parsed


def rename_columns(row, columns: dict):
    """Apply a `columns: {our name: their name}` mapping to one row."""
    if not columns or not isinstance(row, dict):
        return row
    row = dict(row)
    for ours, theirs in columns.items():
        if theirs not in row:
            raise RowError(f"field '{theirs}' (columns.{ours}): missing")
        row[ours] = row.pop(theirs)
    return row


def group_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
