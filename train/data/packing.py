"""Padding-free batches: every sequence of a batch in ONE row, each attending only to its own tokens.

A *block* is a list of token sequences that share their first `p` tokens. Packed, it is laid out
once as [shared prefix][rest of sequence 1][rest of sequence 2]...; each rest attends to the
prefix and to itself, never to another rest, and its position ids continue from the prefix. For
a causal model that is exactly what separate forwards of the sequences compute, while the prefix
(a pair's prompt, or the prompt shared by a labeling group's samples) is computed once.

There is no padding and no mask: the row comes with `spans`, the list of (queries, keys) ranges
that train/attention.py computes attention over, one small attention per span, as flash
attention's variable-length kernels do on a GPU. So no token is computed that the loss does not
need, and no score of one sequence depends on what else is in the batch.
"""
import torch


def shared_prefix(seqs: list) -> int:
    """How many leading tokens all of `seqs` share, leaving each at least one token of its own
    (the token a decoder reads its reward at must belong to that sequence)."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for other in seqs[1:]:
        k = 0
        while k < n and other[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


class Spans(list):
    """(q_start, q_end, key ranges, mask) per span, covering the row in order. mask is None
    (every query sees every key: an encoder), "causal" (keys = queries, causal), or a bool
    (queries, keys) tensor for a sequence's own tokens after a shared prefix. `calls` counts the
    attention layers that used it, so a model that does not pass them on is caught (train/attention.py);
    `plan` is train/attention.py's layout of the row, made by the first layer that reads it;
    `rewards` is the token each span's reward is read at (pack's reward_index, in span order)."""
    calls = 0
    plan = None
    rewards = None


def pack(blocks: list, causal: bool, reward_at: str, types: list = None) -> dict:
    """blocks: lists of token-id lists (types: the same shape of token type ids, or None).

    Returns input_ids and position_ids (1, tokens), token_type_ids if given, `spans`, and
    reward_index: for every sequence, in block order then sequence order, its token index in the
    row. reward_at is "last" (the sequence's last token: decoders) or "first" (its first token, a
    [CLS]: encoders, which share no prefix: every token of theirs sees the whole sequence). Also
    the counts `unique_tokens` (the row's length) and `computed_tokens` (the same: no padding).
    """
    if reward_at == "first" and any(len(b) > 1 for b in blocks):
        raise ValueError("reward_at='first' (an encoder) takes one sequence per block")
    ids, positions, token_types, reward_index, spans = [], [], [], [], Spans()
    for b, seqs in enumerate(blocks):
        p = shared_prefix(seqs) if len(seqs) > 1 else 0
        start = len(ids)
        for k, s in enumerate(seqs):
            own = s[p:] if k else s  # the first sequence carries the prefix
            at = len(ids)
            ids += own
            positions += range(len(s) - len(own), len(s))
            if types is not None:
                token_types += types[b][k][len(s) - len(own):]
            reward_index.append(at if reward_at == "first" else len(ids) - 1)
            if not causal:
                spans.append((at, len(ids), ((at, len(ids)),), None))
            elif k == 0 or p == 0:  # (prefix +) a sequence: plain causal attention over its tokens
                spans.append((at, len(ids), ((at, len(ids)),), "causal"))
            else:  # own tokens see the prefix and, causally, themselves
                n = len(own)
                mask = torch.ones(n, p + n, dtype=torch.bool)
                mask[:, p:] = torch.ones(n, n, dtype=torch.bool).tril()
                spans.append((at, len(ids), ((start, start + p), (at, len(ids))), mask))
    spans.rewards = list(reward_index)  # one sequence per span; the last layer computes only these
    batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]), "spans": spans,
             "reward_index": torch.tensor(reward_index), "unique_tokens": len(ids), "computed_tokens": len(ids)}
    if types is not None:
        batch["token_type_ids"] = torch.tensor([token_types])
    return batch
