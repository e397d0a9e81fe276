"""Bad input: one line naming file, row and field; on_error=skip counts; truncation policy counts; the JSON reader."""
import codecs
import itertools
import json
import re

import pytest
from omegaconf import OmegaConf

from train.data.options import DataSource
from train.data.jsonfile import MAX_DEPTH, iter_json_array, read_rows
from train.data.sources import data_source, read_file
from train.errors import UserError
from tests.conftest import ROOT, final_metrics, launch

GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}


def lines_file(path, lines: list) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def row(**fields):
    r = dict(GOOD, **fields)
    return json.dumps({k: v for k, v in r.items() if v is not ...}).encode()


BAD_ROWS = [
    (b'{"prompt": "p", "chosen": "yes", ', r"row 3: not valid JSON"),
    (row(chosen=...), r"row 3: field 'chosen': missing"),
    (row(rejected=3), r"row 3: field 'rejected': expected a string, got int"),
    (row(chosen="   "), r"row 3: field 'chosen': empty text"),
    (b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "no"}', r"row 3: bytes that are not UTF-8"),
    (row(margin="big"), r"row 3: field 'margin': expected a number, got str"),
    (row(prompt=[{"role": "user"}]), r"row 3: field 'prompt': a list must hold"),
    (b"[1, 2]", r"row 3: expected a JSON object, got list"),
    (row(margin=1e308), r"row 3: field 'margin': expected a number from -1000 to 1000 \(reward units\), got 1e\+308"),
    (row(margin=-1001), r"row 3: field 'margin': expected a number from -1000 to 1000"),
    (row()[:-1] + b', "margin": 1e400}', r"row 3: field 'margin': .* got inf"),  # json reads it as inf
    (row(prompt=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}]),
     r"row 3: field 'prompt': turn 2 has empty content"),
    (row()[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", r"row 3: not valid JSON \(nested too deeply"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_each_bad_row_is_one_line_with_file_row_and_field(tmp_path, bad, message):
    path = lines_file(tmp_path / "d.jsonl", [row(), row(chosen="ok"), bad, row()])
    with pytest.raises(UserError) as err:
        read_file(path, "standard", "raise")
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: ") and re.search(message, text), text


def test_skip_counts_bad_rows(tmp_path):
    path = lines_file(tmp_path / "d.jsonl", [row(), row(chosen=...), row(rejected=3), row(chosen="ok")])
    said = []
    examples = read_file(path, "standard", "skip", log=said.append)
    assert len(examples) == 2 and said == [f"{path}: skipped 2 bad rows (on_error=skip)"]


def test_json_array_files_number_rows_by_element(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, GOOD, {"prompt": "p", "chosen": "a"}]))
    with pytest.raises(UserError, match=r"row 3: field 'rejected': missing"):
        read_file(str(path), "standard", "raise")
    path.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"},\n{"prompt": "p",\n "chosen": }]')
    with pytest.raises(UserError, match=r"row 2: not valid JSON \(Expecting value\)"):
        read_file(str(path), "standard", "raise")


def test_json_arrays_are_streamed(tmp_path):
    """Rows come before the end of the file is read: an array is never parsed whole."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD] * 3)[:-1] + ", oops]")
    rows = read_rows(str(path))
    assert [next(rows), next(rows), next(rows)] == [(1, GOOD), (2, GOOD), (3, GOOD)]
    with pytest.raises(UserError, match=r"row 4: not valid JSON"):
        next(rows)


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_bytes_that_are_not_utf8_name_the_array_element(tmp_path, chunk):
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"a": "\xc3\xa9"},\n {"a": "b"},\n {"a": "caf\xe9"}, {"a": "c"}]')
    rows = iter_json_array(str(path), chunk)
    assert [v for _, v in itertools.islice(rows, 2)] == [{"a": "é"}, {"a": "b"}]
    with pytest.raises(UserError, match=r"d.json: row 3: bytes that are not UTF-8$"):
        next(rows)


@pytest.mark.parametrize("suffix,text", [("jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD)),
                                         ("json", json.dumps([GOOD, GOOD]))])
def test_a_byte_order_mark_is_skipped(tmp_path, suffix, text):
    path = tmp_path / f"d.{suffix}"
    path.write_bytes(codecs.BOM_UTF8 + text.encode())
    assert [e.chosen for e in read_file(str(path), "standard", "raise")] == ["yes", "yes"]


@pytest.mark.parametrize("depth,ok", [(MAX_DEPTH, True), (MAX_DEPTH + 1, False)])
def test_json_nested_deeper_than_the_limit_names_the_row(tmp_path, depth, ok):
    deep = "[" * (depth - 1) + "]" * (depth - 1)  # inside the row object: depth levels in all
    lines = tmp_path / "d.jsonl"
    lines.write_text(f"{json.dumps(GOOD)}\n{json.dumps(GOOD)[:-1]}, \"x\": {deep}}}\n")
    array = tmp_path / "d.json"
    array.write_text(f"[{json.dumps(GOOD)}, {json.dumps(GOOD)[:-1]}, \"x\": {deep}}}]")
    for path in (lines, array):
        if ok:
            assert len(read_file(str(path), "standard", "raise")) == 2
        else:
            with pytest.raises(UserError, match=r"row 2: not valid JSON \(nested too deeply"):
                read_file(str(path), "standard", "raise")


def test_feedback_rows_are_checked_too(tmp_path):
    good = {"type": "pairwise_feedback", "prompt": "p", "output_A": "a", "output_B": "b", "label": 0}
    path = lines_file(tmp_path / "f.jsonl", [json.dumps(good).encode(), json.dumps(dict(good, label=2)).encode()])
    with pytest.raises(UserError, match=r"row 2: field 'label': expected 0 or 1, got 2"):
        read_file(path, "feedback", "raise")
    (example,) = read_file(path, "feedback", "skip", log=lambda *a: None)
    assert (example.chosen, example.rejected) == ("b", "a")  # label 0: B preferred


def test_split_is_seeded_and_disjoint(tmp_path):
    path = lines_file(tmp_path / "d.jsonl", [row(chosen=f"yes {i}") for i in range(50)])
    options = OmegaConf.merge(OmegaConf.structured(DataSource), {"path": path, "test_fraction": 0.2})
    train, test, _ = data_source("jsonl", options)
    again, _, _ = data_source("jsonl", options)
    assert len(test) == 10 and len(train) == 40 and train == again
    assert not {e.chosen for e in train} & {e.chosen for e in test}


def test_bad_row_through_launch_exits_2_with_one_line(tmp_path):
    path = lines_file(tmp_path / "d.jsonl", [row(chosen=f"y{i}") for i in range(20)] + [row(rejected=7)])
    proc = launch(["model=tiny-llama", "datasets=[jsonl]", f"++datasets.jsonl.path={path}",
                   f"cache_dir={tmp_path}"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: {path}: row 21: field 'rejected': expected a string, got int"
    assert not (tmp_path / "reward-model" / "FINAL").exists()


def test_truncation_policies_are_counted(tmp_path):
    long_prompt = " ".join(["word"] * 80)
    rows = [row(chosen=f"y{i}", prompt=long_prompt if i % 2 else "short") for i in range(40)]
    path = lines_file(tmp_path / "d.jsonl", rows)
    base = ["model=tiny-llama", "datasets=[jsonl]", f"++datasets.jsonl.path={path}", "++datasets.jsonl.test_fraction=0.25",
            "model.max_length=32", "batch_size=8", "microbatch_size=8", f"cache_dir={tmp_path}"]
    launch([*base, "exp_name=cut"])
    cut = final_metrics(tmp_path / "cut")
    assert cut["data_train_truncated"] + cut["data_test_truncated"] == 20 and cut["data_train_dropped"] == 0
    launch([*base, "exp_name=drop", "model.truncation=drop"])
    drop = final_metrics(tmp_path / "drop")
    assert drop["data_train_dropped"] + drop["data_test_dropped"] == 20 and drop["data_train_truncated"] == 0
    assert drop["n_pairs"] == 10 - drop["data_test_dropped"]


def test_weights_only_loading_and_no_remote_code_by_default():
    for path in (ROOT / "train").rglob("*.py"):
        for call in re.findall(r"torch\.load\(.*", path.read_text()):  # each call is on one line
            assert "weights_only=True" in call, f"{path}: {call}"
    from train.config import ModelConfig
    assert ModelConfig.trust_remote_code is False
