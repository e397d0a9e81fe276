"""python -m train.export --single-logit: a run's reward model as a one-logit classifier.

    python -m train.export --single-logit RUN/FINAL OUT
    python -m train.export --single-logit RUN/checkpoints/step-N OUT [--overwrite] [--dtype bfloat16]

Training saves a TWO-logit classifier whose reward is logits[:, 1] (train/models.py). Tools that
take a reward model as an AutoModelForSequenceClassification with num_labels=1 (TRL's
`reward_funcs`, OpenRLHF-style loaders) read logits[:, 0]. OUT is that model: the same weights,
with the head's output row 1 (weight and, where the head has one, bias) as its only row, so its
single logit IS the harness's reward (logit 1 alone, not logit 1 - logit 0).

1. SOURCE is a run's FINAL dir, a checkpoint dir (rebuilt from <run>/config.yaml as train.label
   rebuilds it) or any two-logit HF classifier dir. Code shipped with the model runs only with
   --trust_remote_code, never because the run's config.yaml says so.
2. Decoder heads: transformers reads the reward at the rightmost token that is not the pad token,
   training at the last attention-mask 1. Those agree unless a text can end with the pad token
   (pad = eos, as training sets it for tokenizers without one); then OUT's tokenizer gets another
   pad token (unk, or a special token named *pad*), which changes no reward: pads are masked.
   Training feeds such heads no token_type_ids, so OUT's tokenizer makes none either.
3. OUT is written as OUT.tmp-<pid> and renamed into place (train/atomic.py): config (num_labels 1,
   id2label {0: "reward"}, problem_type "regression"), safetensors weights in the source's dtype
   (or --dtype), the tokenizer with its pad token and padding side.
4. Before the rename, OUT is loaded back with plain transformers and scores a padded batch of probe
   texts, formatted as training formats them; it is published only if its logits[:, 0] match the
   source's reward within 1e-5. Both are computed in float32, the source's weights rounded to the
   written dtype first (a no-op unless --dtype narrows them), so the check is of the export itself.
   The last line says what was written and the gap.
"""
import argparse
import copy
import inspect
import json
import os
from types import SimpleNamespace

from train import atomic
from train.config import DTYPE_NAMES
from train.errors import UserError, exit_with_error, storage_error
from train.model_files import model_kind, run_config, settings

TOLERANCE = 1e-5  # the largest |exported - original| reward on the probe texts that is published
# Prompt/response pairs of different lengths (one a chat) for the self-check: padded as one batch.
PROBES = [
    ("What is 2 + 2?", "4."),
    ("Name the capital of France and say one thing it is known for.",
     "Paris. It is known for the Eiffel Tower, built for the 1889 World's Fair."),
    ([{"role": "user", "content": "Write a haiku about rain."}],
     "Soft rain on the roof\nthe gutters hum a low song\nthe street shines again"),
    ("hi", "Hello! How can I help you today?"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    p.add_argument("source", help="a run's FINAL dir, a checkpoint dir (RUN/checkpoints/step-N) or a "
                                  "two-logit HF classifier dir")
    p.add_argument("out", help="the directory to write (its parent must exist)")
    p.add_argument("--single-logit", dest="single_logit", action="store_true",
                   help="write a num_labels=1 classifier whose logits[:, 0] is the reward (the only format so far)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model dir at OUT")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="dtype of the written weights; default: the source's")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="run Python code shipped with the model or tokenizer (auto_map); never taken "
                        "from the run's config.yaml")
    return p.parse_args(argv)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_paths(args):
    """Every refusal that needs no model: a missing or unusable source, an OUT that would be or
    hold the source, an OUT that exists (without --overwrite) or is not a model dir."""
    if not args.single_logit:
        raise UserError("nothing to export: pass --single-logit (the only export format so far)")
    # OUT/ would put the temporary dir inside OUT (train/atomic.py): paths are used normalised
    src, out = args.source, args.out = os.path.normpath(args.source), os.path.normpath(args.out)
    if not os.path.isdir(src):
        raise UserError(f"{src}: no such directory")
    if model_kind(src, option="") == "checkpoint" and run_config(src) is None:  # neither kind: model_kind says so
        raise UserError(f"{src}: a checkpoint dir needs its run's config.yaml two levels up "
                        "(RUN/checkpoints/step-N)")
    real_src, real_out = os.path.realpath(src), os.path.realpath(out)
    if _inside(real_out, real_src):
        raise UserError(f"OUT {out} is {'the source dir' if real_out == real_src else 'inside the source dir'} "
                        f"{src}: choose a directory outside it")
    if _inside(real_src, real_out):
        raise UserError(f"OUT {out} holds the source dir {src}: writing it would replace the source")
    if not os.path.isdir(os.path.dirname(real_out)):
        raise UserError(f"OUT {out}: directory {os.path.dirname(real_out)} does not exist")
    if os.path.lexists(out):
        if not args.overwrite:
            raise UserError(f"OUT {out} exists: pass --overwrite to replace it")
        if not os.path.isdir(out) or (os.listdir(out) and not os.path.isfile(os.path.join(out, "config.json"))):
            raise UserError(f"OUT {out} exists and is not a model dir (no config.json): "
                            "refusing to replace it, even with --overwrite")
    config_file = os.path.join(src, "config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            config = json.load(f)
        labels = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else config.get("num_labels", 2)
        if labels != 2:
            raise UserError(f"{src} is a {labels}-logit classifier: the export reads the reward from a "
                            "two-logit one (a run's FINAL or checkpoint)")


def source_dtype(src: str, run_cfg) -> str:
    """The dtype the source was saved in: its config.json's, else its training run's, else float32."""
    try:
        with open(os.path.join(src, "config.json")) as f:
            config = json.load(f)
        dtype = config.get("dtype") or config.get("torch_dtype")
    except (OSError, ValueError):
        dtype = None
    if dtype not in DTYPE_NAMES and run_cfg is not None:
        dtype = run_cfg.model.dtype
    return dtype if dtype in DTYPE_NAMES else "float32"


def _eos_ids(tokenizer, config) -> set:
    ids = {tokenizer.eos_token_id}
    eos = getattr(config.get_text_config(), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return ids - {None}


def choose_pad(tokenizer, config, encoded: list):
    """For a head that pools the last token: (pad id, note). transformers reads the reward at the
    rightmost non-pad token, so a text must never end with the pad token. When it could (pad =
    eos, or a formatted probe text ends with it), another special token becomes the pad."""
    pad = tokenizer.pad_token_id
    ends = {e["input_ids"][-1] for e in encoded}
    forbidden = _eos_ids(tokenizer, config) | ends
    if pad not in forbidden:
        return pad, ""
    candidates = [tokenizer.unk_token_id] + [i for i, t in sorted(tokenizer.added_tokens_decoder.items())
                                             if t.special and "pad" in t.content.lower()]
    for candidate in candidates:
        if candidate is not None and candidate not in forbidden:
            old = tokenizer.pad_token
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(candidate)
            return candidate, f"; pad token {old!r} -> {tokenizer.pad_token!r}, as texts can end with {old!r}"
    if pad in ends:
        raise UserError(f"formatted texts end with the pad token {tokenizer.pad_token!r} and the tokenizer has no "
                        "other unk or pad token: transformers would read the reward at the wrong token")
    return pad, f"; note: pad token {tokenizer.pad_token!r} is eos, a text that ends with it is scored at the wrong token"


def single_logit_state_dict(hf_model, config, dtype, trust_remote_code: bool):
    """(module with the num_labels=1 layout, its weights in torch dtype `dtype`): every weight of
    hf_model, with row 1 of each head tensor whose label dim shrinks from 2 to 1 (weight [2, H] ->
    [1, H], bias [2] -> [1]). The layout comes from the model class itself, built on the meta
    device (no memory, no init)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config, dtype=dtype,
                                                                  trust_remote_code=trust_remote_code)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    old = hf_model.state_dict()
    if set(shapes) != set(old):
        raise RuntimeError(f"the one-logit model's weights differ from the two-logit model's: "
                           f"{sorted(set(shapes) ^ set(old))[:5]}")
    state, sliced = {}, []
    for key, tensor in old.items():
        if tensor.shape != shapes[key]:
            dims = [d for d, (a, b) in enumerate(zip(tensor.shape, shapes[key])) if (a, b) == (2, 1)]
            if len(tensor.shape) != len(shapes[key]) or len(dims) != 1 or \
                    any(a != b for d, (a, b) in enumerate(zip(tensor.shape, shapes[key])) if d != dims[0]):
                raise RuntimeError(f"{key}: shape {tuple(tensor.shape)} -> {tuple(shapes[key])} is not a label dim 2 -> 1")
            tensor = tensor.narrow(dims[0], 1, 1).clone()  # the reward's row
            sliced.append(key)
        state[key] = tensor.detach().to(dtype).contiguous()
    if not sliced:
        raise RuntimeError("no head tensor has a label dim of 2")
    skeleton.load_state_dict(state, assign=True, strict=True)
    return skeleton, sliced


def one_logit_config(hf_model, pad_token_id: int, dtype: str):
    config = copy.deepcopy(hf_model.config)
    config.num_labels = 1
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    config.problem_type = "regression"
    config.dtype = dtype
    for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        c.pad_token_id = pad_token_id
    return config


def exported_rewards(path: str, samples: list, fmt: dict, trust_remote_code: bool) -> list:
    """logits[:, 0] of the written dir, loaded and fed as a user would: plain transformers, its own
    tokenizer padding one batch (its pad token, its padding side)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from train.labeling.scoring import encode_sample

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.num_labels != 1 or model.config.pad_token_id != tokenizer.pad_token_id:
        raise RuntimeError(f"{path}: num_labels {model.config.num_labels}, pad_token_id "
                           f"{model.config.pad_token_id} (tokenizer's {tokenizer.pad_token_id})")
    accepted = inspect.signature(model.forward).parameters
    keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in accepted else [])
    encoded = [encode_sample(tokenizer, prompt, response, fmt) for prompt, response in samples]
    batch = tokenizer.pad([{k: e[k] for k in keys if k in e} for e in encoded], return_tensors="pt")
    with torch.inference_mode():
        logits = model(**{k: batch[k] for k in keys if k in batch}).logits
    return logits[:, 0].float().tolist()


def export(args):
    check_paths(args)
    # Imported only now: torch and transformers take about 8 s, and a mistake in the paths is
    # reported before that.
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # loading and writing bars would bury the one line this prints
    try:
        write_single_logit(args)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def write_single_logit(args):
    """The export itself, its paths checked: load, slice the head, write, self-check, publish."""
    import torch

    from train.labeling.scoring import Scorer, load_reward_model
    from train.models import DTYPES

    src, out = args.source, args.out
    setup = settings(src, SimpleNamespace(max_length=None, max_prompt_length=None, dtype=None))
    dtype = args.dtype or source_dtype(src, setup["run_config"])
    setup["dtype"] = "float32"  # the self-check compares rewards in float32, whatever is written
    model, tokenizer = load_reward_model(src, setup, args.trust_remote_code)
    hf_model = model.hf_model
    fmt = {k: setup[k] for k in ("max_length", "max_prompt_length", "truncation")}
    scorer = Scorer(model, tokenizer, batch_size=len(PROBES), **fmt)
    encoded = [scorer.encode(prompt, response) for prompt, response in PROBES]
    original = scorer.score_encoded(encoded)  # the harness's reward: logits[:, 1], as labeling reads it
    rounding = ""
    if dtype != "float32":  # compare like with like: the reference gets the written weights' rounding
        full = original
        with torch.no_grad():
            for tensor in hf_model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.to(DTYPES[dtype]))
        original = scorer.score_encoded(encoded)
        rounding = (f" (against the source rounded to {dtype}; the rounding itself moves them by up to "
                    f"{max(abs(a - b) for a, b in zip(original, full)):.2g})")
    pad, note = tokenizer.pad_token_id, ""
    if model.pools_last_token:
        pad, note = choose_pad(tokenizer, hf_model.config, encoded)
        if "token_type_ids" in tokenizer.model_input_names:
            # Training never feeds segment ids to a last-token head (train/models.py), and some
            # (GPT-2) would add them to the embeddings: OUT's tokenizer does not make them.
            names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
            tokenizer.model_input_names = tokenizer.init_kwargs["model_input_names"] = names
    config = one_logit_config(hf_model, pad, dtype)
    skeleton, sliced = single_logit_state_dict(hf_model, config, DTYPES[dtype], args.trust_remote_code)
    name = type(skeleton).__name__
    del model, hf_model, scorer  # the weights the skeleton shares stay; the rest is freed
    try:
        with atomic.write_dir(out) as tmp:
            skeleton.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del skeleton
            exported = exported_rewards(tmp, PROBES, fmt, args.trust_remote_code)
            gap = max(abs(a - b) for a, b in zip(exported, original))
            if not gap <= TOLERANCE:  # also refuses NaN
                raise UserError(f"the exported model's rewards differ from {src}'s by {gap:.3g} (more than "
                                f"{TOLERANCE:g}) on the probe texts: {out} not written")
    except OSError as err:
        raise UserError(storage_error(f"writing {out}", err)) from None
    print(f"wrote {out}: {name} with num_labels=1 ({dtype}); logits[:, 0] is the reward (logits[:, 1] of {src}; head "
          f"{', '.join(sliced)} cut to row 1); max |exported - original| on {len(PROBES)} probe texts "
          f"{gap:.2g}{rounding}{note}")


def main(argv=None):
    try:
        export(parse_args(argv))
    except UserError as err:
        exit_with_error(err)


if __name__ == "__main__":
    main()
