"""Prompt + response -> token ids. The ONE function used at train time and at label time.

Two formats:
- chat: the tokenizer has a chat template; the prompt turns plus an assistant turn are rendered
  by it, and the response tokens are the part after the generation prompt.
- plain: prompt and response are encoded as a text pair with the tokenizer's own special tokens
  (BERT: [CLS] prompt [SEP] response [SEP], with segment ids).

Truncation works on token ids, never on strings, so it is exact. The prompt loses tokens from its
left (the most recent context survives) until it fits max_prompt_length and the pair fits
max_length, but a long response never pushes it below half of max_length (or below its whole
max_prompt_length, when that is less). A cut chat prompt keeps the template's opening special
token (BOS, <|im_start|>) at position 0, in place of the first token the cut left. If the
response is then still too long:
- "keep_end" drops its first tokens: its end, where a decoder reads the score, survives
  ("cut_prompt_left" is the old name of this policy);
- "keep_start" drops its last tokens, as LLaMA-Factory and HALOs do;
- "drop": a pair that does not fit is dropped (encode returns None) and counted by the caller,
  as TRL does.

Only the tokens that truncation can keep are computed: a text much longer than max_length is
tokenised in a window at the end that is kept (the prompt's end; the response's end or start), so
a 50 MB row costs about what a row of max_length tokens costs. The ids are those of the whole text.
"""
import re
from functools import lru_cache
from typing import Optional

TRUNCATION_POLICIES = ("keep_start", "keep_end", "drop", "cut_prompt_left")
# Measured on HH-RLHF (README "Data quality"): keep_start and keep_end tie within one pair of 300;
# keep_start is also what LLaMA-Factory and HALOs do, so a model moved between them reads the same.
DEFAULT_TRUNCATION = "keep_start"


def prompt_as_text(prompt) -> str:
    """A chat prompt rendered without a template, for tokenizers that have none."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{turn['role']}: {turn['content']}" for turn in prompt)


def _as_turns(prompt) -> list:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@lru_cache(maxsize=8)
def _pair_layout(tokenizer):
    """Special tokens around a text pair, read off one encoding: (pre, mid, post, types).

    types holds the segment id of (pre, prompt, mid, response, post), or None when the
    tokenizer returns no token_type_ids.
    """
    enc = tokenizer("a", "b")
    seq = enc.sequence_ids()
    ids = enc["input_ids"]
    first, second = seq.index(0), seq.index(1)
    last_first = max(i for i, s in enumerate(seq) if s == 0)
    last_second = max(i for i, s in enumerate(seq) if s == 1)
    pre, mid, post = ids[:first], ids[last_first + 1:second], ids[last_second + 1:]
    types = None
    if "token_type_ids" in enc:
        tt = enc["token_type_ids"]
        types = (tt[0] if pre else 0, tt[first], tt[second - 1] if mid else tt[first], tt[second],
                 tt[-1] if post else tt[second])
    return pre, mid, post, types


def _texts(tokenizer, prompt, response) -> tuple:
    """(prompt_text, response_text) exactly as the model will see them."""
    if uses_chat_template(tokenizer):
        turns = _as_turns(prompt)
        head = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        if not full.startswith(head):  # a template that rewrites earlier turns: keep it whole
            return "", full
        return head, full[len(head):]
    return prompt_as_text(prompt), response


_GAP = re.compile(r"(?<=\S)\s")  # where a run of whitespace starts, i.e. a word has just ended


def _last_tokens(tokenizer, text: str, need: int) -> list:
    """The ids of the text's last tokens, as tokenising the whole text gives them: all of them, or
    more than `need` of them.

    A long text is tokenised in a window at its end, growing x4 until it yields more than `need`
    tokens. A window starts where whitespace starts, and the tokens of its first word are not
    used: where a word is cut, or what stood before it, changes its tokens (a "▁" prepended by
    SentencePiece, "." and the newlines after it joined by Llama 3), the words after it do not.
    Offsets tell where that first word ends, so this needs a fast tokenizer; a slow one, or a text
    without whitespace, is tokenised whole.
    """
    size = 8 * need + 64  # characters: more than `need` tokens in nearly any text
    while size < len(text) and tokenizer.is_fast:
        first = _GAP.search(text, len(text) - size)
        second = first and _GAP.search(text, first.end())
        if second:
            skip = second.start() - first.start()  # the window's first word ends here
            window = tokenizer(text[first.start():], add_special_tokens=False, return_offsets_mapping=True)
            ids = [i for i, (start, _) in zip(window["input_ids"], window["offset_mapping"]) if start >= skip]
            if len(ids) > need:
                return ids
        size *= 4
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _first_tokens(tokenizer, text: str, need: int) -> list:
    """The ids of the text's first tokens, as tokenising the whole text gives them: all of them,
    or more than `need` of them. The mirror of _last_tokens: a window at the start of the text
    ends where whitespace starts, and the tokens of its last word are not used."""
    size = 8 * need + 64
    while size < len(text) and tokenizer.is_fast:
        end = _GAP.search(text, size)  # the window ends with a whole word...
        last = end and max((m for m in _GAP.finditer(text, 0, end.start())), default=None,
                           key=lambda m: m.start())
        if last:  # ...whose tokens are left out: what follows a word can change them
            window = tokenizer(text[:end.start()], add_special_tokens=False, return_offsets_mapping=True)
            ids = [i for i, (start, _) in zip(window["input_ids"], window["offset_mapping"]) if start < last.start()]
            if len(ids) > need:
                return ids
        size *= 4
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _keep_opening_token(tokenizer, prompt_text: str, p: list) -> list:
    """A chat prompt cut from its left keeps the template's opening special token (a BOS,
    <|im_start|>) in place of the first token the cut left.

    Otherwise position 0 holds whatever token the cut lands on, such as a turn's <|im_end|>.
    Decoders park much of their attention on position 0, and in the SmolLM2 checkpoint
    <|im_end|>'s embedding is all zeros: the hidden state there stays zero through every layer, its
    RMSNorm passes gradients back times 1/sqrt(eps), and on HH-RLHF pairs the gradient grew
    about 1000x per layer down to NaN. An uncut prompt already starts with the opening token.
    """
    opening = _first_tokens(tokenizer, prompt_text, 1)[0]
    added = tokenizer.added_tokens_decoder.get(opening)  # special tokens a template uses are added ones
    if (opening in tokenizer.all_special_ids or getattr(added, "special", False)) and p[0] != opening:
        return [opening] + p[1:]
    return p


def encode(tokenizer, prompt, response: str, max_length: int, max_prompt_length: int,
           truncation: str = DEFAULT_TRUNCATION) -> Optional[dict]:
    """Token ids for one (prompt, response); None when truncation="drop" and it does not fit.

    Returns {"input_ids", "token_type_ids" (or absent), "truncated": bool}.
    """
    prompt_text, response_text = _texts(tokenizer, prompt, response)
    if uses_chat_template(tokenizer):
        pre, mid, post, types = [], [], [], None  # the template holds its own special tokens
    else:
        pre, mid, post, types = _pair_layout(tokenizer)
    budget = max_length - len(pre) - len(mid) - len(post)
    # At most budget response tokens and min(max_prompt_length, budget) prompt tokens are kept, and
    # either text being longer than that is all the fit test below needs to know.
    p = _last_tokens(tokenizer, prompt_text, max(min(max_prompt_length, budget), 0)) if prompt_text else []
    keep_start = truncation == "keep_start"
    r = (_first_tokens if keep_start else _last_tokens)(tokenizer, response_text, max(budget, 0))
    fits = len(p) + len(r) <= budget and len(p) <= max_prompt_length
    if not fits:
        if truncation == "drop":
            return None
        # The prompt gives way to the response, but keeps at least half the budget (or all of its
        # max_prompt_length, if less): a reward for a response to a question it cannot see is noise.
        capped = min(len(p), max_prompt_length)
        p = p[len(p) - min(capped, max(budget - len(r), min(capped, budget // 2))):]
        if len(p) + len(r) > budget:
            r = r[:budget - len(p)] if keep_start else r[len(r) - (budget - len(p)):]
        if uses_chat_template(tokenizer) and p:
            p = _keep_opening_token(tokenizer, prompt_text, p)
    ids = pre + p + mid + r + post
    out = {"input_ids": ids, "truncated": not fits}
    if types is not None:
        parts = (pre, p, mid, r, post)
        out["token_type_ids"] = [t for part, t in zip(parts, types) for _ in part]
    return out
