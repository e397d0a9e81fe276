"""Tests for the embedded synthetic preference data."""
import re

import pytest

from train.data import synthetic
from train.data.synthetic import SUBSETS, held_out, synthetic_examples


def rows(examples):
    return [(e.prompt, e.chosen, e.rejected, e.subset, e.margin) for e in examples]


def text(e):
    return " ".join([e.prompt, e.chosen, e.rejected])


def mentions(value, s):
    return re.search(r"\b" + re.escape(value.lower()) + r"\b", s.lower()) is not None


def test_deterministic():
    for split in ("train", "test"):
        assert rows(synthetic_examples(split, 200, 3)) == rows(synthetic_examples(split, 200, 3))


def test_different_seeds_and_splits_differ():
    assert rows(synthetic_examples("train", 100, 0)) != rows(synthetic_examples("train", 100, 1))
    assert rows(synthetic_examples("train", 100, 0)) != rows(synthetic_examples("test", 100, 0))


def test_count_round_robin_and_labels():
    examples = synthetic_examples("train", 23, 0)
    assert len(examples) == 23
    assert [e.subset for e in examples] == [SUBSETS[i % len(SUBSETS)] for i in range(23)]
    assert all(e.margin is None for e in examples)
    assert len(SUBSETS) == 5


def test_subset_selection():
    examples = synthetic_examples("test", 10, 0, subsets=["refusal", "format"])
    assert [e.subset for e in examples] == ["refusal", "format"] * 5
    # A subset's rows do not depend on which other subsets are requested.
    alone = synthetic_examples("test", 5, 0, subsets=["format"])
    assert rows(alone) == rows(examples[1::2])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="valid"):
        synthetic_examples("valid", 5, 0)
    with pytest.raises(ValueError, match="nonsense"):
        synthetic_examples("train", 5, 0, subsets=["on_topic", "nonsense"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_chosen_differs_and_texts_short(split):
    for e in synthetic_examples(split, 2000, 7):
        assert e.chosen != e.rejected
        assert 0 < len(e.prompt.split()) <= 25, e.prompt
        assert 0 < len(e.chosen.split()) <= 20, e.chosen
        assert 0 < len(e.rejected.split()) <= 20, e.rejected


def test_train_pool_is_not_tiny():
    examples = synthetic_examples("train", 4000, 0)
    for name in SUBSETS:
        these = [e for e in examples if e.subset == name]
        assert len(set(rows(these))) >= 0.8 * len(these), name


def test_coherence_rejected_is_a_shuffle():
    for e in synthetic_examples("train", 200, 0, subsets=["coherence"]):
        strip = lambda s: sorted(w.lower() for w in s.rstrip(".").split())
        assert strip(e.chosen) == strip(e.rejected)


def test_held_out_partition():
    items = list(range(10))
    assert held_out(items, "test") == [3, 7]
    assert sorted(held_out(items, "train") + held_out(items, "test")) == items
    with pytest.raises(ValueError, match="dev"):
        held_out(items, "dev")


def _check_disjoint(subset, values):
    """No test-only value appears in a train row and vice versa."""
    train = [text(e) for e in synthetic_examples("train", 3000, 0, subsets=[subset])]
    test = [text(e) for e in synthetic_examples("test", 1000, 0, subsets=[subset])]
    for v in held_out(values, "test"):
        assert not any(mentions(v, t) for t in train), (subset, v)
    for v in held_out(values, "train"):
        assert not any(mentions(v, t) for t in test), (subset, v)
    # The test split does use its held-out values.
    assert any(mentions(v, t) for v in held_out(values, "test") for t in test)


def test_grounded_fact_holds_out_vocabulary():
    for values in (synthetic.NAMES, synthetic.FACT_OBJECTS, synthetic.COLOURS, synthetic.FACT_PLACES):
        _check_disjoint("grounded_fact", values)


def test_coherence_holds_out_vocabulary():
    for values in (synthetic.NAMES, synthetic.PLACES, synthetic.OBJECTS, synthetic.FOODS):
        _check_disjoint("coherence", values)


def test_on_topic_holds_out_values():
    _check_disjoint("on_topic", [v for values, _ in synthetic.TOPIC_DOMAINS for v in values])


def test_refusal_holds_out_requests_and_phrasings():
    _check_disjoint("refusal", synthetic.HARMFUL_REQUESTS)
    train = synthetic_examples("train", 2000, 0, subsets=["refusal"])
    test = synthetic_examples("test", 500, 0, subsets=["refusal"])
    # Phrasings without {req} can be compared verbatim.
    for pool, attr in ((synthetic.REFUSALS, "chosen"), (synthetic.COMPLIANCES, "rejected")):
        def fixed(split):
            return {p for p in held_out(pool, split) if "{req}" not in p}

        train_texts = {getattr(e, attr) for e in train}
        test_texts = {getattr(e, attr) for e in test}
        assert not train_texts & fixed("test")
        assert not test_texts & fixed("train")
        assert test_texts & fixed("test")


def test_format_holds_out_items_and_instructions():
    items = [i for _, _, group in synthetic.FORMAT_CATEGORIES for i in group]
    _check_disjoint("format", items)
    train = [e.prompt for e in synthetic_examples("train", 2000, 0, subsets=["format"])]
    test = [e.prompt for e in synthetic_examples("test", 500, 0, subsets=["format"])]
    for phrasings in synthetic.FORMAT_INSTRUCTIONS.values():
        assert not any(p.endswith(i) for p in train for i in held_out(phrasings, "test"))
        assert not any(p.endswith(i) for p in test for i in held_out(phrasings, "train"))


def test_templates_held_out():
    # Test-only coherence templates never produce train prompts, and test rows
    # use only test templates.
    def prompt_pattern(template):
        return re.compile("^" + re.sub(r"\\\{\w+\\\}", r"[\\w'-]+", re.escape(template)) + "$")

    train = [e.prompt for e in synthetic_examples("train", 2000, 0, subsets=["coherence"])]
    test = [e.prompt for e in synthetic_examples("test", 500, 0, subsets=["coherence"])]
    test_patterns = [prompt_pattern(p) for p, _ in held_out(synthetic.COHERENCE_TEMPLATES, "test")]
    assert not any(pat.match(p) for p in train for pat in test_patterns)
    assert all(any(pat.match(p) for pat in test_patterns) for p in test)
