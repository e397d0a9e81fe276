"""The reward model for labeling: loaded as its training run built it, fed as training fed it.

- load_reward_model() (and train.model_files.settings()) accept a run's FINAL dir, a checkpoint
  dir (rebuilt from <run>/config.yaml, then its safetensors weights; a LoRA run's adapters are then
  merged, as FINAL's are) or a plain HF classifier dir; FINAL is always plain, LoRA is never applied to it.
  Code shipped with a model runs only with --trust_remote_code, whatever the run's config.yaml says.
- encode_sample() is train.data.formatting.encode, the function training uses.
- Scorer packs batches without padding, sharing each prompt's tokens between its samples on
  decoders (train.data.packing), or pads length-sorted batches (train.data.batching.pad_batch, as
  training pads) for models that cannot pack; EncodedChunks reads and encodes in DataLoader workers.
"""
import itertools
import json
import os

import torch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from train import lora
from train.checkpoint import load_sharded
from train.data.batching import model_inputs, pad_batch
from train.data.formatting import DEFAULT_TRUNCATION, encode
from train.data.packing import pack
from train.errors import UserError
from train.labeling.samples import read_samples
from train.model_files import is_sharded, model_kind
from train.models import (AutoModelForBradleyTerry, build_model, check_positions, load_tokenizer,
                          prepare_tokenizer)

CHUNK_BATCHES = 16  # batches per process per chunk: the span of length sorting, and of lost work on a kill


def load_reward_model(path: str, setup: dict, trust_remote_code: bool = False):
    """(AutoModelForBradleyTerry in eval mode, tokenizer) from a FINAL, checkpoint or classifier dir.

    Code shipped with the model runs only when the caller passes trust_remote_code (the
    command-line flag), never because the run's config.yaml says so: a run dir from someone
    else must not be able to execute code by being labelled."""
    cfg = setup["run_config"]
    checkpoint = model_kind(path) == "checkpoint"
    sources = [d for d in (cfg.model.tokenizer_name_or_path, cfg.model.name_or_path) if d] if checkpoint else [path]
    refusal = "; pass --trust_remote_code to run it"
    found = None if trust_remote_code else shipped_code(sources, needed_only=True)
    if found:  # checked before loading: one line, with no transformers warning before it
        raise UserError(found + refusal)
    try:
        if checkpoint:  # training's construction (with its LoRA adapters, if any), then its weights
            same_dtype = setup["dtype"] == cfg.model.dtype  # else the base is cast: its digest cannot match
            cfg.model.dtype = setup["dtype"]
            cfg.model.trust_remote_code = trust_remote_code
            tokenizer = prepare_tokenizer(cfg)
            model = build_model(cfg, tokenizer)
            if is_sharded(path):  # an FSDP run's checkpoint: its shards, read into the whole model
                load_sharded(path, model)
            else:
                lora.load_weights(model, os.path.join(path, "model.safetensors"), check_base=same_dtype)
                lora.merge(model)  # scored as FINAL would score it: a plain classifier
        else:
            tokenizer = load_tokenizer(path, trust_remote_code, what="--reward_model_path")
            model = AutoModelForBradleyTerry.from_pretrained(
                path, setup["dtype"], tokenizer.pad_token_id,
                cfg.model.attn_implementation if cfg is not None else None, trust_remote_code)
    except ValueError as err:  # transformers refusing code that the check above did not foresee
        if trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise UserError((shipped_code(sources) or f"{sources[0]} ships its own model code") + refusal) from None
    check_positions(model.config.to_dict(), setup["max_length"], path, "max_length")
    return model.eval(), tokenizer


def shipped_code(dirs: list, needed_only: bool = False):
    """'<dir> ships its own model code (auto_map in <file>)' for the first dir whose config.json
    or tokenizer_config.json names code of its own; None if none does. needed_only: only a
    config.json whose model_type transformers does not know, so that loading must run the code."""
    for d in dirs:
        for name in ("config.json", "tokenizer_config.json"):
            try:
                with open(os.path.join(str(d), name)) as f:
                    config = json.load(f)
            except (OSError, ValueError):
                continue
            if not isinstance(config, dict) or "auto_map" not in config:
                continue
            if needed_only and (name != "config.json" or config.get("model_type") in CONFIG_MAPPING):
                continue
            return f"{d} ships its own model code (auto_map in {name})"
    return None


def encode_sample(tokenizer, prompt, output, fmt: dict) -> dict:
    """Token ids of one sample, by the training function; a sample that training would drop is cut."""
    enc = encode(tokenizer, prompt, output, **fmt)
    if enc is None:  # truncation="drop" at training: a sample to label cannot be dropped, so cut it
        enc = encode(tokenizer, prompt, output, **{**fmt, "truncation": DEFAULT_TRUNCATION})
    return enc


class Scorer:
    """Rewards for encoded samples, in batches that waste no compute.

    Packed (train/data/packing.py) when the model allows it: no padding, and with share_prompt a
    decoder computes the prompt tokens that the samples of one prompt_id share once for all of
    them (best-of-n: 4-16 samples per prompt). Otherwise padded, length-sorted batches, as
    training pads. Either way a sample's reward does not depend on its batch."""

    def __init__(self, model, tokenizer, max_length: int, max_prompt_length: int, truncation: str,
                 batch_size: int, device="cpu", packing: bool = True, share_prompt: bool = True):
        self.model, self.tokenizer, self.device = model.to(device), tokenizer, device
        self.format = dict(max_length=max_length, max_prompt_length=max_prompt_length, truncation=truncation)
        self.batch_size = batch_size
        self.packing = model.enable_packing() if packing and hasattr(model, "enable_packing") else None
        self.share_prompt = bool(share_prompt and self.packing and self.packing[0])  # decoders only

    def encode(self, prompt, output) -> dict:
        return encode_sample(self.tokenizer, prompt, output, self.format)

    def batches(self, encoded: list) -> list:
        """Index lists, longest first, so each batch pads to nearly its own length."""
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["input_ids"]))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def collate(self, items: list) -> dict:
        """Padded as training pads its batches, on this scorer's device."""
        types = [e["token_type_ids"] for e in items] if "token_type_ids" in items[0] else None
        batch = pad_batch([e["input_ids"] for e in items], self.tokenizer.pad_token_id, types)
        return {k: v.to(self.device) for k, v in batch.items()}

    def packed_batches(self, encoded: list, groups: list = None) -> list:
        """Lists of blocks (index lists whose samples share a prompt_id when sharing, else one
        sample each) of about batch_size samples; a prompt's samples stay in one block."""
        blocks = {}
        for i in range(len(encoded)):
            key = groups[i] if self.share_prompt and groups is not None and groups[i] is not None else ("alone", i)
            blocks.setdefault(key, []).append(i)
        batches, current, size = [], [], 0
        for block in blocks.values():
            if current and size + len(block) > self.batch_size:
                batches.append(current)
                current, size = [], 0
            current.append(block)
            size += len(block)
        return batches + [current] if current else batches

    def pack(self, items: list) -> dict:
        """Blocks of encodings -> one packed row (train/data/packing.py) on this scorer's device."""
        types = [[e["token_type_ids"] for e in block] for block in items] if "token_type_ids" in items[0][0] else None
        return model_inputs(pack([[e["input_ids"] for e in block] for block in items], *self.packing, types=types),
                            self.device)

    @torch.inference_mode()
    def score_encoded(self, encoded: list, groups: list = None, progress=None) -> list:
        """Rewards in the order of `encoded`; groups: each sample's prompt_id (or None), for sharing;
        progress: called with each batch's number of samples once it is scored (a progress bar)."""
        rewards = [0.0] * len(encoded)
        if self.packing is None:
            for idx in self.batches(encoded):
                for i, r in zip(idx, self.model(**self.collate([encoded[i] for i in idx])).float().tolist()):
                    rewards[i] = r
                if progress:
                    progress(len(idx))
            return rewards
        for blocks in self.packed_batches(encoded, groups):
            scores = self.model(**self.pack([[encoded[i] for i in block] for block in blocks])).float().tolist()
            for i, r in zip([i for block in blocks for i in block], scores):
                rewards[i] = r
            if progress:
                progress(len(scores))
        return rewards


class EncodedChunks(torch.utils.data.IterableDataset):
    """This process's share of each chunk of samples, encoded: (chunk size, rows, encodings,
    truncated, prompt ids).

    Iterated in DataLoader workers, so reading and encoding overlap the forward passes. With n
    workers, worker w takes chunks w, w + n, ...; the DataLoader hands them back in order.
    """

    def __init__(self, path: str, split, skip: int, chunk_size: int, rank: int, world: int, tokenizer, fmt: dict):
        self.path, self.split, self.skip, self.chunk_size = path, split, skip, chunk_size
        self.rank, self.world, self.tokenizer, self.format = rank, world, tokenizer, fmt

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rest = itertools.islice(read_samples(self.path, self.split), self.skip, None)
        for k in itertools.count():
            chunk = list(itertools.islice(rest, self.chunk_size))
            if not chunk:
                return
            if k % workers == worker:
                # Contiguous shares: the samples of one prompt, usually adjacent, stay on one process.
                share = -(-len(chunk) // self.world)
                mine = chunk[self.rank * share:(self.rank + 1) * share]
                encoded = [encode_sample(self.tokenizer, s["prompt"], s["output"], self.format) for _, s in mine]
                yield (len(chunk), [row for row, _ in mine], encoded, sum(e["truncated"] for e in encoded),
                       [s.get("prompt_id") for _, s in mine])
