"""Attention over packed rows (train/data/packing.py) for any transformers model that takes
custom attention functions (`_supports_attention_backend`); used for the types in VERIFIED.

Registered with transformers as the attention implementation "packed". A forward given `spans`
(a keyword argument that such models pass down to every attention layer) computes, for each span,
the attention of its queries over its keys with torch's scaled_dot_product_attention, so nothing
is computed across sequences or over padding. Without `spans` it is plain sdpa with sdpa's masks,
so the same model still takes ordinary padded batches.

prune_last_layer(): an encoder's last layer, under packed batches, computes only the [CLS] tokens
that its reward reads.
"""
import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "packed"


# Not traced by torch.compile (compile=true): its loop over spans would be unrolled into the graph
# and recompiled for every batch; the layers around it still compile, with dynamic lengths.
@torch.compiler.disable
def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     spans=None, **kwargs):
    """query (1, heads, tokens, dim), key and value (1, kv heads, tokens, dim) -> (1, tokens, heads, dim)."""
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    spans.calls += 1
    gqa = query.shape[1] != key.shape[1]
    sizes, plan = _plan(spans)
    # One split per tensor, not one slice per span: a slice's backward writes a zero tensor the size
    # of the whole row, so slicing made the backward quadratic in the number of sequences per row.
    qs, ks, vs = (t.split(sizes, dim=2) for t in (query, key, value))
    outputs = []
    for q_pieces, k_pieces, mask in plan:
        extra = {"is_causal": True} if isinstance(mask, str) else {"attn_mask": None if mask is None else mask.to(query.device)}
        out = F.scaled_dot_product_attention(_join(qs, q_pieces), _join(ks, k_pieces), _join(vs, k_pieces),
                                             dropout_p=dropout, scale=scaling, enable_gqa=gqa, **extra)
        outputs.append(out.transpose(1, 2))
    # sdpa's output is laid out token-major already: joined along the tokens, it is one copy.
    return torch.cat(outputs, dim=1), None


def _plan(spans):
    """The row cut into pieces so that every span's query range and key ranges are runs of whole
    pieces: (piece sizes, [(query pieces, key pieces, mask)] per span). Worked out once per row
    and kept on `spans`, since every layer reuses it."""
    if spans.plan is None:
        cuts = sorted({c for q0, q1, keys, _ in spans for c in (q0, q1, *(c for r in keys for c in r))})
        at = {c: i for i, c in enumerate(cuts)}
        sizes = [b - a for a, b in zip(cuts, cuts[1:])]
        spans.plan = sizes, [(list(range(at[q0], at[q1])), [i for a, b in keys for i in range(at[a], at[b])], mask)
                             for q0, q1, keys, mask in spans]
    return spans.plan


def _join(pieces, which):
    """The pieces `which` of a split tensor, end to end along the sequence dim."""
    return pieces[which[0]] if len(which) == 1 else torch.cat([pieces[i] for i in which], dim=2)


AttentionInterface.register(NAME, packed_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # padded batches get sdpa's masks


# Model types whose packed scores and gradients are tested equal to plain forwards
# (tests/test_packing.py). Others (GPT-2's attention, for one, differs) are padded instead.
VERIFIED = {"bert", "llama"}


def can_pack(hf_model) -> bool:
    """Whether the model is of a verified type, passes keyword arguments down to a pluggable
    attention function, and uses sdpa or eager attention now."""
    return hf_model.config.model_type in VERIFIED and bool(getattr(hf_model, "_supports_attention_backend", False)) \
        and hf_model.config._attn_implementation in ("sdpa", "eager", NAME)


# ---- an encoder's last layer, on its reward tokens only ---------------------------------------------
def prune_last_layer(hf_model):
    """Under packed batches, the last layer of a BERT encoder computes only what the reward reads:
    each sequence's first token ([CLS], which the pooler reads). Its keys and values still come
    from every token; its query, attention output, feed-forward and LayerNorms run on one token
    per sequence instead of all of them (on MiniLM, 1 of 6 layers). Padded batches run the layer
    as usual. The layer's forward is replaced on that instance; its weights are untouched."""
    if hf_model.config.model_type != "bert" or hf_model.config.is_decoder:
        return  # the replacement below is BertLayer's
    layer = hf_model.base_model.encoder.layer[-1]
    if not isinstance(layer.forward, functools.partial):  # once per model
        layer.forward = functools.partial(_reward_tokens_only, layer, layer.forward)


def _reward_tokens_only(layer, plain_forward, hidden_states, attention_mask=None, *args, spans=None, **kwargs):
    """BertLayer.forward for packed rows: the outputs at the spans' first tokens, zeros elsewhere
    (nothing reads them)."""
    if spans is None:
        return plain_forward(hidden_states, attention_mask, *args, **kwargs)
    rows, sees = _reward_rows(spans, hidden_states.shape[1], hidden_states.device)
    own = layer.attention.self
    picked = hidden_states[:, rows]
    heads, size = own.num_attention_heads, own.attention_head_size

    def by_head(x):  # (1, tokens, heads x size) -> (1, heads, tokens, size)
        return x.view(1, x.shape[1], heads, size).transpose(1, 2)

    out = F.scaled_dot_product_attention(by_head(own.query(picked)), by_head(own.key(hidden_states)),
                                         by_head(own.value(hidden_states)), attn_mask=sees,
                                         dropout_p=own.dropout.p if layer.training else 0.0, scale=own.scaling)
    out = layer.feed_forward_chunk(layer.attention.output(out.transpose(1, 2).reshape(1, len(spans), -1), picked))
    return hidden_states.new_zeros(hidden_states.shape).index_copy(1, rows, out)


@torch.compiler.disable  # a loop over the spans, as in packed_attention
def _reward_rows(spans, tokens: int, device) -> tuple:
    """Each span's first token, and a (spans, tokens) mask of the keys each of them sees. Counts
    the layer in spans.calls, as packed_attention does (here, outside any compiled graph)."""
    spans.calls += 1
    sees = torch.zeros(len(spans), tokens, dtype=torch.bool)
    for j, (_, _, keys, _) in enumerate(spans):
        for a, b in keys:
            sees[j, a:b] = True
    return torch.tensor([q0 for q0, *_ in spans], device=device), sees.to(device)
