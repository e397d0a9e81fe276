"""Prompt + response -> token ids. The ONE function used at train time and at label time.

Two formats:
- chat: the tokenizer has a chat template; the prompt turns plus an assistant turn are rendered
  by it, and the response tokens are the part after the generation prompt.
- plain: prompt and response are encoded as a text pair with the tokenizer's own special tokens
  (BERT: [CLS] prompt [SEP] response [SEP], with segment ids).

Truncation works on token ids, never on strings, so it is exact:
- "cut_prompt_left": drop prompt tokens from the left (the most recent context survives) until
  the prompt fits max_prompt_length and the pair fits max_length; if the response alone is
  still too long, drop its first tokens so that its end, where the score is read, survives.
- "drop": a pair that does not fit is dropped (encode returns None) and counted by the caller.
"""
from functools import lru_cache
from typing import Optional

TRUNCATION_POLICIES = ("cut_prompt_left", "drop")


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


def encode(tokenizer, prompt, response: str, max_length: int, max_prompt_length: int,
           truncation: str = "cut_prompt_left") -> Optional[dict]:
    """Token ids for one (prompt, response); None when truncation="drop" and it does not fit.

    Returns {"input_ids", "token_type_ids" (or absent), "truncated": bool}.
    """
    prompt_text, response_text = _texts(tokenizer, prompt, response)
    p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"] if prompt_text else []
    r = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if uses_chat_template(tokenizer):
        pre, mid, post, types = [], [], [], None  # the template holds its own special tokens
    else:
        pre, mid, post, types = _pair_layout(tokenizer)
    budget = max_length - len(pre) - len(mid) - len(post)
    fits = len(p) + len(r) <= budget and len(p) <= max_prompt_length
    if not fits:
        if truncation == "drop":
            return None
        p = p[max(0, len(p) - min(max_prompt_length, max(budget - len(r), 0))):]
        if len(p) + len(r) > budget:
            r = r[len(r) - (budget - len(p)):]
    ids = pre + p + mid + r + post
    out = {"input_ids": ids, "truncated": not fits}
    if types is not None:
        parts = (pre, p, mid, r, post)
        out["token_type_ids"] = [t for part, t in zip(parts, types) for _ in part]
    return out
