"""PreferenceExamples -> tokenised datasets (cached) -> padded batches of chosen+rejected.

The training order is a function of (seed, epoch) only, and a global batch is a slice of it, so
the data position of a run is just its optimizer step: resuming needs no iterator state, and
1 process or N processes see the same global batches (each process takes its own slice).
"""
import os
from dataclasses import asdict

import datasets
import torch
from datasets.fingerprint import Hasher

from train.data.batching import pad_batch
from train.data.formatting import encode
from train.data.packing import pack
from train.data.sources import load_source
from train.data.options import source_options
from train.errors import UserError

# A pair whose chosen and rejected tokens are identical (after truncation) teaches nothing: its two
# rewards are equal whatever the weights. A few such pairs are dropped quietly (counted as "identical"); more
# than this share of a split means model.max_length cuts away what tells the answers apart, and the
# run would train on far less data than the user gave it, so it stops instead.
MAX_IDENTICAL_SHARE = 0.02
# Part of the cache key: bump it when the columns written by tokenize() change, or the ids
# formatting.encode() gives (4: a cut chat prompt keeps its opening token).
CACHE_FORMAT = 4
# Length grouping (epoch_order) sorts spans of this many batches: wide enough that most batches
# find partners of nearly their length, narrow enough that an epoch's steps stay well mixed.
GROUP_BATCHES = 64
# The token counts every collated batch carries (Collator), summed into each train record.
TOKEN_COUNTS = ("tokens", "unique_tokens", "computed_tokens")


def load_examples(cfg, log=print, counts: dict = None) -> tuple:
    """(train, test) PreferenceExample lists from every selected source, in config order.

    Each example records its source name. Rows that a source's policies skip are logged, and
    added to `counts` (when given) as "<source>_skipped_<reason>": n.
    """
    train, test = [], []
    for name, options in cfg.datasets.items():
        tr, te, skipped = load_source(name, source_options(name, options))
        for example in tr + te:
            example.source = name
        train += tr
        test += te
        said = ", ".join(f"{k[len('skipped_'):]} {v}" for k, v in sorted(skipped.items()))
        log(f"datasets.{name}: {len(tr)} training and {len(te)} held-out pairs" + (f"; skipped rows: {said}" if said else ""))
        if counts is not None:
            counts.update({f"{name}_{k}": v for k, v in skipped.items()})
    return train, test


def _rows(examples) -> dict:
    return {
        "prompt": [e.prompt if isinstance(e.prompt, str) else None for e in examples],
        "turns": [e.prompt if not isinstance(e.prompt, str) else None for e in examples],
        "chosen": [e.chosen for e in examples],
        "rejected": [e.rejected for e in examples],
        "margin": [e.margin for e in examples],
        "subset": [e.subset for e in examples],
        "source": [e.source for e in examples],
        "index": list(range(len(examples))),
    }


def tokenize(examples, tokenizer, model_cfg, cache_dir: str) -> tuple:
    """A datasets.Dataset of token ids, cached on disk by content; plus {truncated, dropped, identical} counts.

    A pair is dropped when truncation="drop" finds it too long ("dropped"), or when its chosen and
    rejected tokens are the same after truncation ("identical"); too many identical pairs stop the run.
    """
    opts = dict(max_length=model_cfg.max_length, max_prompt_length=model_cfg.max_prompt_length,
                truncation=model_cfg.truncation)

    nothing = {"input_ids": [], "truncated": False}

    def encode_batch(batch):
        out = {k: [] for k in ("chosen_ids", "rejected_ids", "chosen_types", "rejected_types",
                               "truncated", "status", "margin", "subset", "source", "index")}
        for i in range(len(batch["index"])):
            prompt = batch["prompt"][i] if batch["prompt"][i] is not None else batch["turns"][i]
            c = encode(tokenizer, prompt, batch["chosen"][i], **opts)
            r = encode(tokenizer, prompt, batch["rejected"][i], **opts)
            # Every pair keeps a row with its status, so the counts come back with the cached dataset.
            if c is None or r is None:  # truncation="drop": the pair does not fit
                status, c, r = "dropped", nothing, nothing
            elif c["input_ids"] == r["input_ids"] and c.get("token_type_ids") == r.get("token_type_ids"):
                status = "identical"
            else:
                status = "kept"
            out["chosen_ids"].append(c["input_ids"])
            out["rejected_ids"].append(r["input_ids"])
            out["chosen_types"].append(c.get("token_type_ids"))
            out["rejected_types"].append(r.get("token_type_ids"))
            out["truncated"].append(status == "kept" and (c["truncated"] or r["truncated"]))
            out["status"].append(status)
            for key in ("margin", "subset", "source", "index"):
                out[key].append(batch[key][i])
        return out

    raw = datasets.Dataset.from_dict(_rows(examples))
    key = Hasher.hash([[asdict(e) for e in examples], tokenizer.name_or_path, len(tokenizer),
                       tokenizer.chat_template, opts, CACHE_FORMAT])
    os.makedirs(cache_dir, exist_ok=True)
    ds = raw.map(encode_batch, batched=True, remove_columns=raw.column_names,
                 cache_file_name=os.path.join(cache_dir, f"tokenized-{key}.arrow"),
                 desc="tokenizing", new_fingerprint=key)
    status = list(ds["status"])
    counts = {"truncated": int(sum(ds["truncated"])), "dropped": status.count("dropped"),
              "identical": status.count("identical")}
    if counts["identical"] > MAX_IDENTICAL_SHARE * len(status):
        raise UserError(f"{counts['identical']} of {len(status)} pairs have identical chosen and rejected tokens "
                        f"after truncation to model.max_length={model_cfg.max_length} (more than "
                        f"{MAX_IDENTICAL_SHARE:.0%}): set a larger model.max_length")
    kept = ds.select([i for i, s in enumerate(status) if s == "kept"]).remove_columns("status")
    return kept.with_format(None), counts


def epoch_order(n: int, seed: int, epoch: int, lengths: list = None, batch_size: int = 1) -> list:
    """The shuffled training order of one epoch: the same for every process and every resume.

    With `lengths` (one per row), pairs of similar length share a batch: the shuffled order is
    cut into spans of GROUP_BATCHES batches, each span is sorted by length, and the whole batches
    are then shuffled, so a step's microbatches need little padding (or pack densely) while the
    order of steps stays random. Still a function of (seed, epoch) and the data only.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if lengths is None or batch_size >= n:
        return order
    span = batch_size * GROUP_BATCHES
    grouped = []
    for start in range(0, n, span):
        grouped += sorted(order[start:start + span], key=lambda i: -lengths[i])  # stable: ties keep the shuffle
    whole = n // batch_size  # an incomplete last batch is never trained on (trainers.py)
    batches = [grouped[k * batch_size:(k + 1) * batch_size] for k in range(whole)]
    return [i for k in torch.randperm(whole, generator=generator).tolist() for i in batches[k]] + \
        grouped[whole * batch_size:]


class Collator:
    """Rows -> one batch of chosen and rejected sequences, plus the pair fields and token counts.

    Padded (packing=None): chosen rows first, then rejected rows, right-padded to the longest.
    Packed (packing=(causal, reward_at), train/data/packing.py): the sequences go padding-free
    into rows; with share_prompt on a causal model each pair is one block, so the prompt (the
    tokens chosen and rejected share) is computed once. Either way the model returns the chosen
    rewards first, then the rejected ones.
    Token counts: `tokens` (chosen + rejected as given), `unique_tokens` (what the forward has to
    compute: fewer when the prompt is shared) and `computed_tokens` (positions, padding included).
    """

    def __init__(self, pad_token_id: int, packing: tuple = None, share_prompt: bool = False):
        self.pad_token_id, self.packing = pad_token_id, packing
        self.share_prompt = bool(packing and packing[0] and share_prompt)  # causal models only

    def __call__(self, rows: list) -> dict:
        chosen, rejected = [r["chosen_ids"] for r in rows], [r["rejected_ids"] for r in rows]
        types = None
        if rows[0]["chosen_types"] is not None:
            types = [r["chosen_types"] for r in rows] + [r["rejected_types"] for r in rows]
        tokens = sum(map(len, chosen + rejected))
        if self.packing is None:
            batch = pad_batch(chosen + rejected, self.pad_token_id, types)
            batch.update(unique_tokens=tokens, computed_tokens=batch["input_ids"].numel())
        elif self.share_prompt:
            pairs = [[c, r] for c, r in zip(chosen, rejected)]
            pair_types = types and [[t, u] for t, u in zip(types[:len(rows)], types[len(rows):])]
            batch = pack(pairs, *self.packing, types=pair_types)
            batch["reward_index"] = batch["reward_index"].view(-1, 2).t().flatten()  # pair order -> chosen, rejected
        else:
            batch = pack([[s] for s in chosen + rejected], *self.packing, types=types and [[t] for t in types])
        batch.update(tokens=tokens, margin=torch.tensor([r["margin"] if r["margin"] is not None else 0.0 for r in rows]),
                     index=[r["index"] for r in rows], subset=[r["subset"] for r in rows],
                     source=[r.get("source", "") for r in rows])
        return batch


def select(ds, indices) -> list:
    """Rows of a tokenised dataset as dicts, in the order given."""
    part = ds[list(indices)]
    return [{k: part[k][i] for k in part} for i in range(len(indices))]
