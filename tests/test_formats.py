"""Bring your own data: every row format, file type and named dataset config, on small files written here."""
import gzip
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import ROOT, final_metrics, launch
from train.config import register, validate
from train.data.loader import load_examples
from train.errors import UserError

HH_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "harmless-base-test.jsonl.gz"


def composed(*overrides):
    register()
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose("config", overrides=list(overrides))


def load(*overrides, counts=None):
    cfg = composed(*overrides)
    validate(cfg)
    return load_examples(cfg, log=lambda *a: None, counts=counts)


def write_jsonl(path: Path, rows: list) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def everything(train, test) -> list:
    return sorted(train + test, key=lambda e: (str(e.prompt), e.chosen))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# One row per format, each the same preference: for "q{i}", "good{i}" beats "bad{i}".
def rows_in(fmt: str, n: int = 10) -> list:
    make = {
        "standard": lambda i: {"prompt": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}"},
        "conversational": lambda i: {"prompt": [user(f"q{i}")], "chosen": [assistant(f"good{i}")],
                                     "rejected": [assistant(f"bad{i}")]},
        "implicit-messages": lambda i: {"chosen": [user(f"q{i}"), assistant(f"good{i}")],
                                        "rejected": [user(f"q{i}"), assistant(f"bad{i}")]},
        "ultrafeedback": lambda i: {"prompt": f"q{i}", "prompt_id": str(i), "score_chosen": 8.0, "score_rejected": 3.0,
                                    "chosen": [user(f"q{i}"), assistant(f"good{i}")],
                                    "rejected": [user(f"q{i}"), assistant(f"bad{i}")]},
        "hh": lambda i: {"chosen": f"\n\nHuman: q{i}\n\nAssistant: good{i}",
                         "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad{i}"},
        "sharegpt": lambda i: {"conversations": [{"from": "human", "value": f"q{i}"}],
                               "chosen": {"from": "gpt", "value": f"good{i}"},
                               "rejected": {"from": "gpt", "value": f"bad{i}"}},
        "feedback": lambda i: {"type": "pairwise_feedback", "prompt_id": i, "prompt": f"q{i}", "output_A": f"bad{i}",
                               "output_B": f"good{i}", "label": 0},
        "scored": lambda i: {"prompt": f"q{i}", "responses": [f"bad{i}", f"good{i}"], "scores": [1, 9]},
        "shp": lambda i: {"history": f"q{i}", "human_ref_A": f"good{i}", "human_ref_B": f"bad{i}", "labels": 1,
                          "score_ratio": 3.0, "domain": "askscience_train"},
        "helpsteer2": lambda i: {"split": "train" if i % 5 else "val", "prompt": f"q{i}", "response_1": f"bad{i}",
                                 "response_2": f"good{i}", "preference_strength": 2},
    }[fmt]
    return [make(i) for i in range(n)]


def plain_prompt(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


@pytest.mark.parametrize("fmt", ["standard", "conversational", "implicit-messages", "ultrafeedback", "hh",
                                 "sharegpt", "feedback", "scored", "shp", "helpsteer2"])
def test_each_format_is_detected_and_gives_the_same_pairs(tmp_path, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", rows_in(fmt))
    train, test = load("datasets=[jsonl]", f"++datasets.jsonl.path={path}", "++datasets.jsonl.test_fraction=0.2")
    pairs = {(plain_prompt(e.prompt), e.chosen, e.rejected) for e in train + test}
    assert pairs == {(f"q{i}", f"good{i}", f"bad{i}") for i in range(10)}
    assert len(test) == 2 and all(e.source == "jsonl" for e in train + test)


def test_a_row_that_fits_no_format_names_its_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows_in("standard", 3) + [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"d.jsonl: row 4: fits no known format \(its fields: answer, question\)"):
        load("datasets=[jsonl]", f"++datasets.jsonl.path={path}")


def test_a_forced_format_reports_the_field_it_misses(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows_in("standard", 3))
    with pytest.raises(UserError, match=r"d.jsonl: row 1: field 'conversations': expected a list"):
        load("datasets=[jsonl]", f"++datasets.jsonl.path={path}", "++datasets.jsonl.format=sharegpt")


def test_column_mapping(tmp_path):
    rows = [{"question": f"q{i}", "response_j": f"good{i}", "response_k": f"bad{i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, test = load("datasets=[jsonl]", f"++datasets.jsonl.path={path}",
                       "++datasets.jsonl.columns={prompt: question, chosen: response_j, rejected: response_k}")
    assert {(e.prompt, e.chosen) for e in train + test} == {(f"q{i}", f"good{i}") for i in range(10)}
    with pytest.raises(UserError, match=r"row 1: field 'quest' \(columns.prompt\): missing"):
        load("datasets=[jsonl]", f"++datasets.jsonl.path={path}", "++datasets.jsonl.columns={prompt: quest}")


def test_file_types_and_save_to_disk_read_the_same_pairs(tmp_path):
    import datasets
    import pandas as pd

    rows = rows_in("standard")
    frame = pd.DataFrame(rows)
    files = {"d.jsonl.gz": write_jsonl(tmp_path / "d.jsonl.gz", rows)}
    (tmp_path / "d.json").write_text(json.dumps(rows))
    files["d.json"] = str(tmp_path / "d.json")
    for name, write in (("d.parquet", frame.to_parquet), ("d.csv", lambda p: frame.to_csv(p, index=False)),
                        ("d.csv.gz", lambda p: frame.to_csv(p, index=False)),
                        ("d.tsv", lambda p: frame.to_csv(p, index=False, sep="\t"))):
        write(str(tmp_path / name))
        files[name] = str(tmp_path / name)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    files["disk"] = str(tmp_path / "disk")
    expected = None
    for name, path in files.items():
        got = everything(*load("datasets=[jsonl]", f"++datasets.jsonl.path={path}"))
        expected = expected or got
        assert got == expected and len(got) == 10, name
    # reading them hid datasets' progress bars only while it read: tokenizing and downloads keep theirs
    assert datasets.utils.logging.is_progress_bar_enabled()
    # A DatasetDict's named splits are the train and held-out parts.
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:7]), "test": datasets.Dataset.from_list(rows[7:])}
                         ).save_to_disk(str(tmp_path / "dict"))
    train, test = load("datasets=[jsonl]", f"++datasets.jsonl.path={tmp_path / 'dict'}", "++datasets.jsonl.test_split=test")
    assert [e.prompt for e in test] == ["q7", "q8", "q9"] and len(train) == 7
    with pytest.raises(UserError, match=r"dict: no split 'dev' \(it has: train, test\)"):
        load("datasets=[jsonl]", f"++datasets.jsonl.path={tmp_path / 'dict'}", "++datasets.jsonl.split=dev")


def test_bad_files_are_one_line(tmp_path):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(UserError, match=r"d.xlsx: unknown file type '.xlsx'"):
        load("datasets=[jsonl]", f"++datasets.jsonl.path={tmp_path / 'd.xlsx'}")
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n')[:30])
    with pytest.raises(UserError, match=r"d.jsonl.gz: cannot read: Compressed file ended"):
        load("datasets=[jsonl]", f"++datasets.jsonl.path={tmp_path / 'd.jsonl.gz'}")
    write_jsonl(tmp_path / "e.jsonl", rows_in("standard", 3) + [dict(rows_in("standard", 1)[0], chosen=5)])
    with pytest.raises(UserError, match=r"e.jsonl: row 4: field 'chosen': expected a string, got int$"):
        load("datasets=[jsonl]", f"++datasets.jsonl.path={tmp_path / 'e.jsonl'}")


def test_hh_transcripts_divergent_and_empty_rows_are_counted(tmp_path):
    rows = rows_in("hh", 8) + [
        {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
         "rejected": "\n\nHuman: a\n\nAssistant: B!\n\nHuman: c\n\nAssistant: bad"},  # differs before the last turn
        {"chosen": "\n\nHuman: x\n\nAssistant:", "rejected": "\n\nHuman: x\n\nAssistant: no"}]  # empty answer
    path = write_jsonl(tmp_path / "hh.jsonl.gz", rows)
    counts = {}
    train, test = load("datasets=[hh]", f"++datasets.hh.path={path}", counts=counts)
    assert len(train) + len(test) == 8 and counts == {"hh_skipped_divergent": 1, "hh_skipped_empty_response": 1}
    multi = write_jsonl(tmp_path / "multi.jsonl", [
        {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
         "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad"}] * 3)
    train, test = load("datasets=[hh]", f"++datasets.hh.path={multi}")
    assert train[0].prompt == [user("a"), assistant("b"), user("c")] and train[0].chosen == "good"
    with pytest.raises(UserError, match=r"hh.jsonl.gz: row 9: fields 'chosen' and 'rejected' differ before"):
        load("datasets=[hh]", f"++datasets.hh.path={path}", "++datasets.hh.divergent=raise")


@pytest.mark.skipif(not HH_DATA.exists(), reason="the shared HH-RLHF file is not here")
def test_the_shared_hh_rlhf_file_reads_as_it_is():
    counts = {}
    train, test = load("datasets=[hh]", f"++datasets.hh.path={HH_DATA}", counts=counts)
    assert len(train) + len(test) + sum(counts.values()) == 2312
    assert counts["hh_skipped_divergent"] == 5 and len(test) > 200


def test_scored_rows_become_pairs_by_policy(tmp_path):
    rows = [{"prompt": f"q{p}", "response": f"r{p}-{s}", "score": s} for p in range(10) for s in (1, 2, 5, 9)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    base = ["datasets=[jsonl]", f"++datasets.jsonl.path={path}", "++datasets.jsonl.test_fraction=0.2"]
    train, test = load(*base)
    assert len(train) + len(test) == 10 and all(e.chosen.endswith("-9") and e.rejected.endswith("-1")
                                                for e in train + test)
    assert len({e.prompt for e in test}) == 2 and not {e.prompt for e in test} & {e.prompt for e in train}
    train, test = load(*base, "++datasets.jsonl.pairs=all", "++datasets.jsonl.min_score_gap=3")
    # pairs 3+ apart among 1, 2, 5, 9: (9,1) (9,2) (9,5) (5,1) (5,2)
    assert len(train) + len(test) == 50
    train, test = load(*base, "++datasets.jsonl.pairs=all", "++datasets.jsonl.max_pairs_per_prompt=2")
    assert len(train) + len(test) == 20


def test_chitchat_layout(tmp_path):
    def chat(prompt, rating, words):
        return {"prompt": prompt, "ratings": {"witty": rating, "upbeat": rating, "interesting": rating},
                "messages": [[{"text": f"hi {words}", "sender": "s1"}], [{"text": "hello", "sender": "s2"}]]}
    chats = {f"{p}-{r}": chat(f"prompt {p}", r, f"{p} {r}") for p in range(5) for r in (2, 5, 9)}
    chats["unrated"] = {"prompt": "prompt 0", "messages": []}
    (tmp_path / "dataset.json").write_text(json.dumps(chats))
    counts = {}
    train, test = load("datasets=[chitchat]", f"++datasets.chitchat.path={tmp_path / 'dataset.json'}", counts=counts)
    # scores 2, 5, 9 at least 2 apart: three pairs per prompt; the unrated chat is skipped and counted
    assert len(train) + len(test) == 15 and counts == {"chitchat_skipped_bad_rows": 1}
    assert all(e.chosen.startswith("A: hi") and "\nB: hello" in e.chosen for e in train)


@pytest.mark.parametrize("config,fmt", [("ultrafeedback-binarized", "ultrafeedback"), ("shp", "shp"),
                                        ("helpsteer2", "helpsteer2"), ("hh", "hh"), ("feedback", "feedback")])
def test_named_configs_read_a_local_copy(tmp_path, config, fmt):
    rows = rows_in(fmt)
    if fmt == "shp":
        rows[0]["score_ratio"] = 1.5  # below the SHP authors' filter of 2
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    counts = {}
    train, test = load(f"datasets=[{config}]", f"++datasets.{config}.path={path}", counts=counts)
    assert len(train) + len(test) + sum(counts.values()) == 10
    assert all(e.chosen.startswith("good") and e.source == config for e in train + test)
    if fmt == "shp":
        assert counts == {"shp_skipped_score_ratio": 1} and {e.subset for e in train} == {"askscience_train"}
    if fmt == "helpsteer2":  # its rows carry their split
        assert sorted(e.chosen for e in test) == ["good0", "good5"]


def test_a_hub_dataset_that_is_not_cached_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError) as err:
        load("datasets=[hh]")
    text = str(err.value)
    assert "\n" not in text and text.startswith("Anthropic/hh-rlhf data_dir harmless-base split train is not in the "
                                                "local HF cache") and "++datasets.<name>.path=FILE" in text


def test_mixing_weights_caps_and_per_source_reports(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", rows_in("standard", 40))
    b = write_jsonl(tmp_path / "b.jsonl", rows_in("sharegpt", 40))
    base = ["datasets=[jsonl,feedback]", f"++datasets.jsonl.path={a}", f"++datasets.feedback.path={b}",
            "++datasets.feedback.format=sharegpt", "++datasets.jsonl.test_fraction=0.25",
            "++datasets.feedback.test_fraction=0.25"]
    train, test = load(*base, "++datasets.jsonl.weight=0.5", "++datasets.feedback.weight=2")
    by = {s: [e for e in train if e.source == s] for s in ("jsonl", "feedback")}
    assert len(by["jsonl"]) == 15 and len(by["feedback"]) == 60 and len(test) == 20
    assert len({e.chosen for e in by["feedback"]}) == 30  # each pair twice
    train, _ = load(*base, "++datasets.feedback.max_examples=7")
    assert sum(e.source == "feedback" for e in train) == 7
    with pytest.raises(UserError, match=r"datasets.jsonl.weight must be at least 0, got -1.0"):
        load(*base, "++datasets.jsonl.weight=-1")
    with pytest.raises(UserError, match=r"datasets.jsonl.format=sharegtp: expected one of .*did you mean 'sharegpt'"):
        load(*base, "++datasets.jsonl.format=sharegtp")


def test_a_run_on_two_sources_reports_accuracy_per_source_and_counts(tmp_path):
    hh = write_jsonl(tmp_path / "hh.jsonl", rows_in("hh", 30) + [
        {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: y\n\nAssistant: b"}])
    sg = write_jsonl(tmp_path / "sg.json", rows_in("sharegpt", 30))
    launch(["model=tiny-llama", "datasets=[hh,jsonl]", f"++datasets.hh.path={hh}", f"++datasets.jsonl.path={sg}",
            "++datasets.hh.test_fraction=0.3", "++datasets.jsonl.test_fraction=0.3", "batch_size=8",
            "microbatch_size=8", f"cache_dir={tmp_path}", "exp_name=mix"])
    metrics = final_metrics(tmp_path / "mix")
    assert metrics["data_hh_skipped_divergent"] == 1 and metrics["n_pairs"] == 18
    assert os.path.isfile(tmp_path / "mix" / "FINAL" / "metrics.json")


def readme_data_commands() -> list:
    """The launch commands of the README's "Bring your own data" block, as override lists."""
    import shlex

    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Bring your own data"):]
    block = block[block.index("```bash"):block.index("```", block.index("```bash") + 7)]
    return [shlex.split(line.split("#")[0])[1:] for line in block.splitlines() if line.startswith("$P ")]


def test_every_readme_data_command_reads_its_example_file():
    commands = readme_data_commands()
    assert len(commands) == 13
    # each into a run dir of its own: a second run into the same one is refused
    assert len({o for overrides in commands for o in overrides if o.startswith("exp_name=")}) == 13
    for overrides in commands:
        train, test = load(*overrides)
        pairs = {(plain_prompt(e.prompt), e.chosen) for e in train + test}
        assert len(pairs) >= 12 and all("?" in p or "." in p for p, _ in pairs), overrides


def test_a_pair_of_one_text_twice_is_skipped_and_counted(tmp_path):
    same = dict(rows_in("standard", 1)[0], rejected=rows_in("standard", 1)[0]["chosen"])
    path = write_jsonl(tmp_path / "d.jsonl", rows_in("standard", 11) + [same])
    counts = {}
    train, test = load("datasets=[jsonl]", f"++datasets.jsonl.path={path}", counts=counts)
    assert len(train) + len(test) == 11 and counts == {"jsonl_skipped_identical": 1}


def test_a_preference_row_missing_a_field_or_holding_null_names_the_field(tmp_path):
    for bad, message in [({"prompt": "q", "chosen": "a"}, "field 'rejected': missing"),
                         ({"prompt": "q", "chosen": None, "rejected": "b"}, "field 'chosen': expected a string, got null"),
                         ({"prompt": [user("q")], "chosen": [assistant("a")]}, "field 'rejected': missing")]:
        path = write_jsonl(tmp_path / "d.jsonl", rows_in("standard", 3) + [bad])
        with pytest.raises(UserError, match=rf"d.jsonl: row 4: {message}$"):
            load("datasets=[jsonl]", f"++datasets.jsonl.path={path}")


def test_a_dataset_option_for_a_source_that_is_not_selected_is_refused():
    from train.config import check_overrides

    with pytest.raises(UserError, match=r"'datasets.jsonl.path' sets dataset 'jsonl', which is not selected "
                                        r"\(datasets=\[synthetic\]\): add datasets=\[jsonl\] to train on it alone, "
                                        r"or datasets=\[synthetic,jsonl\] to mix them"):
        check_overrides(["++datasets.jsonl.path=x.jsonl"])
    with pytest.raises(UserError, match=r"not selected \(datasets=\[hh\]\)"):
        check_overrides(["datasets=[hh]", "++datasets.jsonl.path=x.jsonl"])
    check_overrides(["datasets=[hh,jsonl]", "++datasets.jsonl.path=x.jsonl"])  # selected: fine
    check_overrides(["datasets.synthetic.n_train=100"])  # the default source
    # train.evaluate starts from the run's own sources, which config.yaml's default does not name
    check_overrides(["++datasets.hh.test_path=x.jsonl"], datasets_selected=False)


def test_a_misspelt_role_is_one_line(tmp_path):
    bad = dict(rows_in("conversational", 1)[0], prompt=[{"role": "usr", "content": "hello?"}])
    path = write_jsonl(tmp_path / "d.jsonl", rows_in("conversational", 3) + [bad])
    with pytest.raises(UserError, match=r"d.jsonl: row 4: field 'prompt': turn 1 has role 'usr' "
                                        r"\(did you mean 'user'\?\); expected one of system, developer, user"):
        load("datasets=[jsonl]", f"++datasets.jsonl.path={path}")
