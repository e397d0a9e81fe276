"""LoRA through peft (model.peft.enabled=true): low-rank adapters on a frozen base, a reward head
trained in full, checkpoints of the trained tensors only, and a merged, plain FINAL.

- apply(): peft's LoraModel puts the adapters into model.hf_model IN PLACE. The classifier keeps
  its class and attribute paths (base_model, score / classifier, pooler), so
  AutoModelForBradleyTerry's padded and packed forwards work unchanged. peft freezes every base
  weight; the reward head is then made trainable as a whole. It is not put in peft's
  modules_to_save: that wrapper keeps a second, frozen copy of the head for switching adapters,
  which a single-adapter reward model never does, and it would hide the nn.Linear the forward
  and the packing check look for. BERT's pooler is pretrained and stays frozen, as in peft's own
  sequence-classification setup (target_modules=all-linear gives it an adapter).
- save_weights() / load_weights(): a checkpoint's model.safetensors. Under LoRA it holds only the
  trainable tensors (adapters + head) and the sha256 of the frozen weights; the base is rebuilt
  from model.name_or_path (or init_config + seed) at resume, and a base that changed meanwhile is
  refused, since the adapters would no longer fit it.
- merge(): merge_and_unload, after which the model is an ordinary classifier again; FINAL is
  saved from it (AutoModelForBradleyTerry.save_pretrained) and loads without peft.

peft is imported only here and only when LoRA is on: its import costs seconds.
"""
import hashlib

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from train.errors import UserError

HEADS = ("score", "classifier")  # the reward head: a decoder's per-position `score`, an encoder's `classifier`
ADAPTER = "default"  # peft's adapter name: one adapter per model here
BASE_KEY = "lora_base_sha256"  # metadata of a LoRA checkpoint's model.safetensors: the frozen weights it fits


def enabled(model_cfg) -> bool:
    """model.peft.enabled; a run config written before LoRA existed has no model.peft: full fine-tuning."""
    return bool(OmegaConf.select(model_cfg, "peft.enabled", default=False))


def apply(model, settings):
    """Adapters on model.hf_model per `settings` (model.peft), base frozen, head trainable; sets and
    returns model.lora (peft's LoraModel, kept for merging)."""
    from peft import LoraConfig, LoraModel, TaskType
    from peft.functional import cast_adapter_dtype
    from peft.tuners.tuners_utils import BaseTunerLayer

    hf = model.hf_model
    name = next((n for n in HEADS if isinstance(getattr(hf, n, None), torch.nn.Module)), None)
    if name is None:
        raise UserError(f"model.peft: {type(hf).__name__} has no reward head named {' or '.join(HEADS)}, so LoRA "
                        "cannot tell which module to train in full; set model.peft.enabled=false")
    targets = settings.target_modules
    targets = OmegaConf.to_container(targets) if OmegaConf.is_config(targets) else targets
    # SEQ_CLS: with target_modules=all-linear, peft leaves the head out (it is trained in full instead).
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=settings.r, lora_alpha=settings.alpha,
                        lora_dropout=settings.dropout, target_modules=targets)
    try:
        tuner = LoraModel(hf, config, ADAPTER)
    except ValueError as err:  # no default targets for this model type, or names that match nothing
        raise UserError(f"model.peft.target_modules={targets!r} for model type {hf.config.model_type}: "
                        f"{str(err).splitlines()[0]}") from None
    # On a bfloat16/float16 base the adapters are kept in float32, as peft's get_peft_model keeps
    # them: AdamW updates to 16-bit weights get lost. The head stays in the base's dtype.
    cast_adapter_dtype(hf, ADAPTER)
    head = getattr(hf, name)
    if any(isinstance(m, BaseTunerLayer) for m in head.modules()):
        raise UserError(f"model.peft.target_modules={targets!r} puts an adapter on the reward head '{name}', "
                        "which is trained in full anyway: leave it out")
    head.requires_grad_(True)
    # Not registered as a submodule: LoraModel wraps hf_model, whose weights would then appear
    # twice in parameters() and state_dict().
    object.__setattr__(model, "lora", tuner)
    return tuner


def merge(model):
    """Adapters merged into the base weights, in place; a no-op for a model without LoRA."""
    if getattr(model, "lora", None) is None:
        return model
    model.hf_model = model.lora.merge_and_unload()
    object.__setattr__(model, "lora", None)
    return model


def summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"LoRA: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%): adapters + head"


def trainable(model) -> dict:
    """name -> parameter, for the parameters that train (all of them without LoRA)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def base_digest(model) -> str:
    """sha256 over the frozen weights' names, dtypes, shapes and bytes. They never change during a
    run, so it is computed once per model (on its first checkpoint save or load)."""
    cached = model.__dict__.get("_lora_base_digest")
    if cached is None:
        h = hashlib.sha256()
        for name, p in model.named_parameters():
            if not p.requires_grad:
                h.update(f"{name}|{p.dtype}|{tuple(p.shape)}|".encode())
                h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy())
        cached = model.__dict__["_lora_base_digest"] = h.hexdigest()
    return cached


def save_weights(model, path: str):
    """A checkpoint's weights: every tensor (safetensors' save_model handles tied weights), or under
    LoRA only the trainable ones, with the digest of the base they were trained on."""
    if getattr(model, "lora", None) is None:
        save_model(model, path)
        return
    tensors = {name: p.detach().contiguous() for name, p in trainable(model).items()}
    save_file(tensors, path, metadata={"format": "pt", BASE_KEY: base_digest(model)})


def load_weights(model, path: str, check_base: bool = True):
    """Weights saved by save_weights() into `model`, built as the run built it. Under LoRA the
    trainable tensors must be exactly those of the file; check_base: the frozen weights must be the
    ones they were trained on (off where the base is deliberately cast, e.g. labeling in bfloat16)."""
    with safe_open(path, "pt") as f:
        saved_base = (f.metadata() or {}).get(BASE_KEY)
    if getattr(model, "lora", None) is None:
        if saved_base is not None:
            raise UserError(f"{path} holds LoRA adapters and a head only, but the model is built without "
                            "model.peft.enabled=true")
        load_model(model, path)
        return
    if saved_base is None:
        raise UserError(f"{path} holds full weights, not LoRA adapters: it was saved by a run without "
                        "model.peft.enabled=true")
    tensors, params = load_file(path), trainable(model)
    if tensors.keys() != params.keys() or any(tensors[k].shape != p.shape for k, p in params.items()):
        odd = sorted(tensors.keys() ^ params.keys()) or [k for k, p in params.items() if tensors[k].shape != p.shape]
        raise UserError(f"{path}: its LoRA tensors do not fit this model's adapters and head ({odd[0]}); "
                        "were model.peft settings changed?")
    if check_base and saved_base != base_digest(model):
        raise UserError(f"{path} was trained on other base weights than model.name_or_path / model.init_config "
                        "give now: its adapters would not fit them")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
