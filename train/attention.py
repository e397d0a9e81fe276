"""Attention over packed rows (train/data/packing.py) for any transformers model that takes
custom attention functions (`_supports_attention_backend`); used for the types in VERIFIED.

Registered with transformers as the attention implementation "packed". A forward given `spans`
(a keyword argument that such models pass down to every attention layer) computes, for each span,
the attention of its queries over its keys with torch's scaled_dot_product_attention, so nothing
is computed across sequences or over padding. Without `spans` it is plain sdpa with sdpa's masks,
so the same model still takes ordinary padded batches.

prune_last_layer(): under packed batches, the last layer computes only the tokens that the reward
reads (an encoder's [CLS], a decoder's last token of each sequence).
"""
import contextlib
import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.models.llama.modeling_llama import rotate_half

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
    outputs = []
    context, tensors = _fp32_on_cpu(query, key, value)
    with context:
        # One split per tensor, not one slice per span: a slice's backward writes a zero tensor the size
        # of the whole row, so slicing made the backward quadratic in the number of sequences per row.
        qs, ks, vs = (t.split(sizes, dim=2) for t in tensors)
        for q_pieces, k_pieces, mask in plan:
            extra = {"is_causal": True} if isinstance(mask, str) else {"attn_mask": None if mask is None else mask.to(query.device)}
            out = F.scaled_dot_product_attention(_join(qs, q_pieces), _join(ks, k_pieces), _join(vs, k_pieces),
                                                 dropout_p=dropout, scale=scaling, enable_gqa=gqa, **extra)
            outputs.append(out.transpose(1, 2))
    # sdpa's output is laid out token-major already: joined along the tokens, it is one copy.
    return torch.cat(outputs, dim=1).to(query.dtype), None


def _fp32_on_cpu(*tensors):
    """(a context, the tensors to attend with): float32, with CPU autocast off (it would cast them
    back down), when they are on a CPU and any is bf16/fp16; else as they are. Under bf16 autocast on
    a CPU, torch's flash-attention kernel ran 3x slower than in fp32 (its backward 4x) on MiniLM's
    shapes and took 40% of a step on HH pairs; fp32 attention is also the more exact. A GPU keeps its
    bf16 kernels."""
    if any(t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16) for t in tensors):
        return torch.autocast("cpu", enabled=False), tuple(t.float() for t in tensors)
    return contextlib.nullcontext(), tensors


def _attend(query, key, value, **kwargs):
    """scaled_dot_product_attention through _fp32_on_cpu; the output in the query's dtype."""
    context, (q, k, v) = _fp32_on_cpu(query, key, value)
    with context:
        return F.scaled_dot_product_attention(q, k, v, **kwargs).to(query.dtype)


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


# ---- the last layer, on the reward tokens only --------------------------------------------------
def prune_last_layer(hf_model):
    """Under packed batches, the last layer computes only what the reward reads: one token per
    sequence, its first ([CLS], which a BERT pooler reads) or, in a decoder, its last. Its keys and
    values still come from every token; its query, attention output, feed-forward and norms run on
    one token per sequence instead of all of them (on MiniLM, 1 of 6 layers; on SmolLM2, 1 of 30).
    Padded batches run the layer as usual. The layer's forward is replaced on that instance; its
    weights are untouched."""
    kind = hf_model.config.model_type
    if kind == "bert" and not hf_model.config.is_decoder:
        layer, pruned = hf_model.base_model.encoder.layer[-1], _bert_reward_tokens_only
    elif kind == "llama":
        layer, pruned = hf_model.base_model.layers[-1], _llama_reward_tokens_only
    else:
        return  # the replacements below are BertLayer's and LlamaDecoderLayer's
    if not isinstance(layer.forward, functools.partial):  # once per model
        layer.forward = functools.partial(pruned, layer, layer.forward)


def _bert_reward_tokens_only(layer, plain_forward, hidden_states, attention_mask=None, *args, spans=None, **kwargs):
    """BertLayer.forward for packed rows: the outputs at the spans' first tokens, zeros elsewhere
    (nothing reads them)."""
    if spans is None:
        return plain_forward(hidden_states, attention_mask, *args, **kwargs)
    rows, sees = _reward_rows(spans, hidden_states.shape[1], hidden_states.device)
    own = layer.attention.self
    picked = hidden_states[:, rows]
    out = _attend(_by_head(own.query(picked), own.attention_head_size),
                  _by_head(own.key(hidden_states), own.attention_head_size),
                  _by_head(own.value(hidden_states), own.attention_head_size), attn_mask=sees,
                  dropout_p=own.dropout.p if layer.training else 0.0, scale=own.scaling)
    out = layer.feed_forward_chunk(layer.attention.output(out.transpose(1, 2).reshape(1, len(spans), -1), picked))
    return hidden_states.new_zeros(hidden_states.shape).index_copy(1, rows, out)


def _llama_reward_tokens_only(layer, plain_forward, hidden_states, attention_mask=None, *args, spans=None,
                              position_embeddings=None, **kwargs):
    """LlamaDecoderLayer.forward for packed rows: the outputs at the spans' last tokens, zeros
    elsewhere. A span's last token sees all of that span's keys (the last row of a causal mask)."""
    if spans is None:
        return plain_forward(hidden_states, attention_mask, *args, position_embeddings=position_embeddings, **kwargs)
    rows, sees = _reward_rows(spans, hidden_states.shape[1], hidden_states.device)
    own = layer.self_attn
    normed = layer.input_layernorm(hidden_states)
    cos, sin = position_embeddings
    query = _by_head(own.q_proj(normed[:, rows]), own.head_dim)
    key = _by_head(own.k_proj(normed), own.head_dim)
    # apply_rotary_pos_emb rotates a query and a key at the same positions: here they differ.
    query = query * cos[:, None, rows] + rotate_half(query) * sin[:, None, rows]
    key = key * cos[:, None] + rotate_half(key) * sin[:, None]
    out = _attend(query, key, _by_head(own.v_proj(normed), own.head_dim), attn_mask=sees,
                  dropout_p=own.attention_dropout if layer.training else 0.0,
                  scale=own.scaling, enable_gqa=query.shape[1] != key.shape[1])
    out = hidden_states[:, rows] + own.o_proj(out.transpose(1, 2).reshape(1, len(spans), -1))
    out = out + layer.mlp(layer.post_attention_layernorm(out))
    return hidden_states.new_zeros(hidden_states.shape).index_copy(1, rows, out)


def _by_head(x, size):
    """(1, tokens, heads x size) -> (1, heads, tokens, size)."""
    return x.view(1, x.shape[1], -1, size).transpose(1, 2)


@torch.compiler.disable  # a loop over the spans, as in packed_attention
def _reward_rows(spans, tokens: int, device) -> tuple:
    """Each span's reward token (pack() chose it: an encoder's first, a decoder's last), and a
    (spans, tokens) mask of the keys it sees: all of its span's. Counts the layer in spans.calls,
    as packed_attention does (here, outside any compiled graph)."""
    spans.calls += 1
    sees = torch.zeros(len(spans), tokens, dtype=torch.bool)
    for j, (_, _, keys, _) in enumerate(spans):
        for a, b in keys:
            sees[j, a:b] = True
    return torch.tensor(spans.rewards, device=device), sees.to(device)
