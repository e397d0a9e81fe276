"""Attention over packed rows (train/data/packing.py) for any transformers model that takes
custom attention functions (`_supports_attention_backend`); used for the types in VERIFIED.

Registered with transformers as the attention implementation "packed". A forward given `spans`
(a keyword argument that such models pass down to every attention layer) computes, for each span,
the attention of its queries over its keys with torch's scaled_dot_product_attention, so nothing
is computed across sequences or over padding. Without `spans` it is plain sdpa with sdpa's masks,
so the same model still takes ordinary padded batches.
"""
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
        outputs.append(F.scaled_dot_product_attention(_join(qs, q_pieces), _join(ks, k_pieces), _join(vs, k_pieces),
                                                      dropout_p=dropout, scale=scaling, enable_gqa=gqa, **extra))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


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
