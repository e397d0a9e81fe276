"""LoRA (model.peft.enabled=true, train/lora.py): what trains, what checkpoints and FINAL hold,
exact resume after SIGKILL, labeling of the merged FINAL and of a LoRA checkpoint, one-line
config errors; the padded and packed forwards with adapters; one real MiniLM (BERT) run."""
import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tests.conftest import (PYTHON, ROOT, SHARED_RUN, TINY, env, error_line, final_weights, launch, launch_each,
                            main_in_process)
from tests.test_packing import MINILM, TINY_LLAMA, alone, collated, rows, scores_and_grads
from tests.test_resume import assert_same_run, killed_at
from train import export as export_module
from train import label as label_module
from train import lora
from train.build import fixed_eval_indices
from train.data.formatting import encode
from train.data.loader import Collator, load_examples
from train.errors import UserError
from train.models import AutoModelForBradleyTerry, build_model, load_tokenizer, prepare_tokenizer

LORA = [*SHARED_RUN, "model.peft.enabled=true", "model.peft.r=4"]  # 12 steps, checkpoints step-8 and step-10 kept
SETTINGS = SimpleNamespace(r=4, alpha=8.0, dropout=0.0, target_modules=None)
ADAPTED = ("q_proj", "v_proj")  # peft's default targets for Llama


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted tiny-llama LoRA run: (run dir, its stdout)."""
    cache = tmp_path_factory.mktemp("lora")
    proc = launch([*LORA, "write_predictions=true", f"cache_dir={cache}", "exp_name=lora"])
    return cache / "lora", proc.stdout


def fresh_model(run_dir: Path):
    """The run's model as build_model makes it before training: its base, adapters at their start (B = 0)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    return build_model(cfg, prepare_tokenizer(cfg))


def eval_pairs(run_dir: Path) -> list:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    _, test = load_examples(cfg, log=lambda *a: None)
    return [test[i] for i in fixed_eval_indices(len(test), cfg.n_eval_examples)]


def test_only_adapters_and_head_train_and_the_base_stays(run):
    run_dir, stdout = run
    # 2 layers x (q_proj: A 4x64 + B 64x4; v_proj: A 4x64 + B 32x4) + the head 2x64, of 2,029,376
    assert "LoRA: training 1,920 of 2,029,376 parameters (0.09%): adapters + head" in stdout
    step = run_dir / "checkpoints" / "step-10" / "model.safetensors"
    saved = load_file(str(step))
    with safe_open(str(step), "pt") as f:
        assert len(f.metadata()[lora.BASE_KEY]) == 64  # the sha256 of the frozen base it fits
    fresh = fresh_model(run_dir)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert saved.keys() == trainable and len(trainable) == 2 * 2 * 2 + 1
    assert all(".lora_A." in n or ".lora_B." in n or n == "hf_model.score.weight" for n in trainable)
    assert all(n.rsplit(".", 3)[0].endswith(ADAPTED) for n in trainable if ".lora_" in n)
    assert not torch.equal(saved["hf_model.score.weight"], fresh.hf_model.score.weight)  # the head trained
    assert all(saved[n].abs().sum() > 0 for n in trainable if ".lora_B." in n)  # adapters left 0

    # FINAL is plain and merged: base weights without adapters are exactly the untouched base,
    # adapted ones are base + B A (changed), and the head is the trained one.
    base = lora.merge(fresh).hf_model.state_dict()  # B = 0: merging changes no weight
    final = final_weights(run_dir)
    assert final.keys() == base.keys() and not any("lora" in k or "base_layer" in k for k in final)
    changed = {k for k in final if not torch.equal(final[k], base[k])}
    assert changed == {k for k in final if k.endswith(tuple(f"{m}.weight" for m in ADAPTED))} | {"score.weight"}
    assert not torch.equal(final["score.weight"], saved["hf_model.score.weight"])  # steps 11-12 came after step-10
    assert "peft" not in (run_dir / "FINAL" / "config.json").read_text()


def test_merged_final_loads_with_plain_transformers_and_scores_as_the_run_did(run):
    """The predictions were scored at the final eval by the model with adapters still attached;
    FINAL, merged and loaded by plain transformers, reproduces them."""
    run_dir, _ = run
    cfg = OmegaConf.load(run_dir / "config.yaml").model
    predictions = [json.loads(line) for line in (run_dir / "generated_predictions.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(str(run_dir / "FINAL"))
    model = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "FINAL")).eval()
    got, want = [], []
    with torch.no_grad():
        for pair, prediction in list(zip(eval_pairs(run_dir), predictions))[:12]:
            for side in ("chosen", "rejected"):
                ids = encode(tokenizer, pair.prompt, getattr(pair, side), cfg.max_length, cfg.max_prompt_length)
                got.append(model(input_ids=torch.tensor([ids["input_ids"]])).logits[0, 1].item())
                want.append(prediction[side])
    assert got == pytest.approx(want, abs=1e-5)


# train.label with peft made unimportable: FINAL must not need it.
NO_PEFT = "import runpy, sys\nsys.modules['peft'] = None\nsys.argv = ['train.label'] + sys.argv[1:]\n" \
          "runpy.run_module('train.label', run_name='__main__', alter_sys=True)\n"


def test_train_label_reads_the_merged_final_without_peft(run, tmp_path):
    run_dir, _ = run
    pairs = eval_pairs(run_dir)
    predictions = [json.loads(line) for line in (run_dir / "generated_predictions.jsonl").read_text().splitlines()]
    samples = tmp_path / "eval-pairs.jsonl"
    samples.write_text("".join(json.dumps({"prompt": e.prompt, "output": getattr(e, side)}) + "\n"
                               for e in pairs for side in ("chosen", "rejected")))
    proc = subprocess.run([PYTHON, "-c", NO_PEFT, "--reward_model_path", str(run_dir / "FINAL"), str(samples),
                           str(tmp_path / "scores.jsonl")], cwd=ROOT, env=env(OMP_NUM_THREADS=1),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert rewards == pytest.approx([p[side] for p in predictions for side in ("chosen", "rejected")], abs=1e-5)


def test_a_lora_checkpoint_is_labelled_and_exported_as_its_adapted_model(run, tmp_path, capsys):
    """A checkpoint dir is rebuilt from the run config (base + adapters), loaded and merged; its
    rewards are those of the model with adapters attached, scored one sample at a time."""
    run_dir, _ = run
    step = run_dir / "checkpoints" / "step-10"
    model = fresh_model(run_dir).eval()
    lora.load_weights(model, str(step / "model.safetensors"))
    assert model.lora is not None  # scored unmerged, as training scored it
    cfg = OmegaConf.load(run_dir / "config.yaml").model
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path)
    pairs = eval_pairs(run_dir)[:6]
    samples = [{"prompt": e.prompt, "output": getattr(e, side)} for e in pairs for side in ("chosen", "rejected")]
    with torch.no_grad():
        expected = []
        for s in samples:
            ids = encode(tokenizer, s["prompt"], s["output"], cfg.max_length, cfg.max_prompt_length)["input_ids"]
            expected.append(model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item())
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    code, _, err = main_in_process(label_module.main, capsys, "--reward_model_path", step, tmp_path / "samples.jsonl",
                                   tmp_path / "out.jsonl")
    assert code == 0, err
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rewards == pytest.approx(expected, abs=1e-5)
    # train.export rebuilds it the same way; its own check compares the written model within 1e-5
    code, out, err = main_in_process(export_module.main, capsys, "--single-logit", step, tmp_path / "one-logit")
    assert code == 0, err
    assert not any("lora" in k for k in load_file(str(tmp_path / "one-logit" / "model.safetensors")))


def test_sigkill_then_resume_is_bit_identical(run, tmp_path):
    """Killed after step 7 (checkpoints step-4 and step-6 hold adapters + head only), resumed with
    resume=auto on a freshly built base: FINAL and every record equal the uninterrupted run's."""
    reference, _ = run
    args = [*LORA, f"cache_dir={tmp_path}", "exp_name=run"]
    killed_at("after_step:7", args)
    resumed = launch([*args, "resume=auto"])
    run_dir = tmp_path / "run"
    assert f"resumed from {run_dir}/checkpoints/step-6 at step 6" in resumed.stdout
    assert_same_run(run_dir, reference)


PEFT_MISTAKES = [
    (["model.peft.r=0"], r"model.peft.r must be more than 0, got 0"),
    (["model.peft.alpha=-1"], r"model.peft.alpha must be more than 0, got -1.0"),
    (["model.peft.dropout=1"], r"model.peft.dropout must be at least 0 and less than 1, got 1.0"),
    (["model.peft.alpah=4"], r"unknown config key 'model.peft.alpah' \(did you mean 'alpha'\?\)"),
    (["model.peft.r=eight"], r"config key 'model.peft.r' must be a whole number, got 'eight'"),
    (["model.peft.target_modules=[]"], r"model.peft.target_modules must be null, all-linear or a list"),
    # found only once the model is built, still before any step:
    (["model.peft.enabled=true", "model.peft.target_modules=[nope]"],
     r"model.peft.target_modules=\['nope'\] for model type llama: Target modules \{'nope'\} not found"),
    (["model.peft.enabled=true", "model.peft.target_modules=[score]"],
     r"puts an adapter on the reward head 'score'"),
]


def test_bad_peft_values_give_one_line(cache):
    procs = launch_each([[*TINY, *args, f"cache_dir={cache}", f"exp_name=bad{i}"]
                         for i, (args, _) in enumerate(PEFT_MISTAKES)])
    for (args, expected), proc in zip(PEFT_MISTAKES, procs):
        line = error_line(proc)
        assert re.search(expected, line), line
    # and as a fresh `python launch.py`, the case the brief names
    proc = launch([*TINY, "model.peft.enabled=true", "model.peft.r=0", f"cache_dir={cache}"], check=False)
    assert proc.returncode == 2 and proc.stderr == "error: model.peft.r must be more than 0, got 0\n"


# ---- in process ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MINILM)


def with_adapters(name: str, tokenizer, settings=SETTINGS):
    """MiniLM or a tiny Llama with LoRA, its adapters moved off their zero start so they matter."""
    if name == "minilm":
        model = AutoModelForBradleyTerry.from_pretrained(MINILM, pad_token_id=tokenizer.pad_token_id)
    else:
        model = AutoModelForBradleyTerry.from_config(TINY_LLAMA, pad_token_id=tokenizer.pad_token_id)
    lora.apply(model, settings)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in lora.trainable(model).items():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", ["minilm", "tiny-llama"])
def test_padded_and_packed_forwards_agree_with_adapters(tokenizer, name):
    """The adapters change nothing in how batches are formed: padded, packed and prompt-shared
    forwards give each sequence's score and gradient alone (as tests/test_packing.py checks without them)."""
    model = with_adapters(name, tokenizer)
    spec = model.enable_packing()
    assert spec == ((True, "last") if name == "tiny-llama" else (False, "first"))
    data = rows(tokenizer)
    ref_scores, ref_grads = scores_and_grads(model, alone(model, data))
    assert ref_grads.numel() == sum(p.numel() for p in lora.trainable(model).values())  # only those get gradients
    for collate in (Collator(tokenizer.pad_token_id), Collator(tokenizer.pad_token_id, spec),
                    Collator(tokenizer.pad_token_id, spec, share_prompt=True)):
        scores, grads = scores_and_grads(model, collated(model, collate(data)))
        assert torch.allclose(scores, ref_scores, atol=1e-5, rtol=0)
        assert (grads - ref_grads).norm() <= 1e-4 * ref_grads.norm()
    merged = lora.merge(model)  # merging keeps the scores
    assert torch.allclose(torch.cat(alone(merged, data)()).detach(), ref_scores, atol=1e-5, rtol=0)


def test_targets_and_the_head():
    """Default targets for BERT are query/value; all-linear adds every linear layer, the pooler's too,
    but never the head, which trains in full. MiniLM's pooler is pretrained and stays frozen otherwise."""
    tok = load_tokenizer(MINILM)
    default = with_adapters("minilm", tok)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[1] for n in lora.trainable(default) if ".lora_A." in n}
    assert adapted == {"query", "value"}
    assert {n for n in lora.trainable(default) if ".lora_" not in n} == {"hf_model.classifier.weight",
                                                                          "hf_model.classifier.bias"}
    every = with_adapters("minilm", tok, SimpleNamespace(**{**vars(SETTINGS), "target_modules": "all-linear"}))
    names = {n.split(".lora_A")[0] for n in lora.trainable(every) if ".lora_A." in n}
    assert "hf_model.bert.pooler.dense" in names and not any("classifier" in n for n in names)
    assert isinstance(every.hf_model.classifier, torch.nn.Linear) and every.packing() == (False, "first")
    llama = with_adapters("tiny-llama", tok, SimpleNamespace(**{**vars(SETTINGS), "target_modules": "all-linear"}))
    assert isinstance(llama.hf_model.score, torch.nn.Linear) and llama.hf_model.score.weight.requires_grad


def test_adapters_on_a_bfloat16_base_are_float32(tokenizer):
    model = AutoModelForBradleyTerry.from_config(TINY_LLAMA, dtype="bfloat16", pad_token_id=tokenizer.pad_token_id)
    lora.apply(model, SETTINGS)
    dtypes = {n: p.dtype for n, p in lora.trainable(model).items()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert dtypes["hf_model.score.weight"] == torch.bfloat16
    ids = torch.tensor([rows(tokenizer)[0]["chosen_ids"]])
    model(ids, torch.ones_like(ids)).float().sum().backward()
    assert all(p.grad is not None for p in lora.trainable(model).values())


def test_a_checkpoint_does_not_load_onto_another_base(tmp_path):
    tok = load_tokenizer(MINILM)
    model = with_adapters("tiny-llama", tok)
    lora.save_weights(model, str(tmp_path / "w.safetensors"))
    same = with_adapters("tiny-llama", tok)
    lora.load_weights(same, str(tmp_path / "w.safetensors"))
    assert all(torch.equal(p, same.state_dict()[n]) for n, p in model.state_dict().items())
    other = AutoModelForBradleyTerry.from_config(TINY_LLAMA, pad_token_id=tok.pad_token_id, seed=1)
    lora.apply(other, SETTINGS)
    with pytest.raises(UserError, match="trained on other base weights"):
        lora.load_weights(other, str(tmp_path / "w.safetensors"))
    plain = AutoModelForBradleyTerry.from_config(TINY_LLAMA, pad_token_id=tok.pad_token_id)
    with pytest.raises(UserError, match="holds LoRA adapters and a head only"):
        lora.load_weights(plain, str(tmp_path / "w.safetensors"))


# ---- a real BERT -------------------------------------------------------------------------------
def test_minilm_lora_run_trains_query_value_adapters_and_the_classifier(cache):
    args = ["model=minilm", "model.peft.enabled=true", "datasets.synthetic.n_train=64", "datasets.synthetic.n_test=16",
            "n_eval_examples=16", "batch_size=16", "microbatch_size=16", "eval_every=1000", "do_first_eval=false",
            "lr=1e-3", "model.max_length=96", "model.max_prompt_length=48", f"cache_dir={cache}", "exp_name=bert"]
    proc = launch(args)
    # 6 layers x (query + value) x (A 8x384 + B 384x8) + the classifier (2x384 + 2), of 22,787,714
    assert "LoRA: training 74,498 of 22,787,714 parameters" in proc.stdout
    final = final_weights(Path(cache) / "bert")
    bundled = load_file(str(Path(MINILM) / "model.safetensors"))
    bundled.pop("embeddings.position_ids", None)  # a buffer, not a weight: FINAL does not hold it
    assert "pooler.dense.weight" in bundled
    for name, tensor in bundled.items():
        adapted = name.endswith(("attention.self.query.weight", "attention.self.value.weight"))
        assert torch.equal(final[f"bert.{name}"], tensor) is not adapted, name  # the pooler is among the unchanged
    assert set(final) - {f"bert.{n}" for n in bundled} >= {"classifier.weight", "classifier.bias"}
    plain = AutoModelForSequenceClassification.from_pretrained(str(Path(cache) / "bert" / "FINAL"))
    assert plain.config.num_labels == 2
