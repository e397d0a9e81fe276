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
    outputs = []
    for q0, q1, keys, mask in spans:
        k, v = _ranges(key, keys), _ranges(value, keys)
        extra = {"is_causal": True} if isinstance(mask, str) else {"attn_mask": None if mask is None else mask.to(query.device)}
        outputs.append(F.scaled_dot_product_attention(query[:, :, q0:q1], k, v, dropout_p=dropout, scale=scaling,
                                                      enable_gqa=gqa, **extra))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _ranges(states, ranges):
    """The token ranges of key or value states, along the sequence dim (a view when there is one range)."""
    if len(ranges) == 1:
        return states[:, :, ranges[0][0]:ranges[0][1]]
    return torch.cat([states[:, :, a:b] for a, b in ranges], dim=2)


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
