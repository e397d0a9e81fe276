"""Model and tokenizer loading for training and labeling: AutoModelForBradleyTerry, a two-logit
sequence classifier whose reward is logits[:, 1]; build_model() and prepare_tokenizer() from a run's config.

Any checkpoint that AutoModelForSequenceClassification can load works. Decoder heads (Llama,
Qwen, Mistral, Gemma, Pythia...) pool at the last non-pad token found by comparing input ids
with pad_token_id; that reads the wrong position when pad == eos and a text ends with eos. So for
those heads we read the hidden state at the last position where attention_mask is 1, which is
right for any padding. Encoder heads (BERT) pool the first token and need no such care.
"""
import os
import socket
import urllib.parse

import huggingface_hub
import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from train import atomic, attention, lora
from train.config import DTYPE_NAMES
from train.errors import UserError
from train.model_files import position_limit

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right- or left-padded attention mask."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask).argmax(dim=1)


# Files one of which every saved model or tokenizer dir holds.
MODEL_DIR_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json")


def _check_local_or_hub(name: str, what: str):
    """Hub ids are allowed, but an offline machine, a path that does not exist and a dir that holds
    no model (a run dir instead of its FINAL, say) each fail in one clear line."""
    if os.path.isfile(name):
        raise UserError(f"{what} '{name}' is a file: pass the directory that holds the model")
    if os.path.isdir(name):
        if not any(os.path.isfile(os.path.join(name, f)) for f in MODEL_DIR_FILES):
            final = os.path.join(name, "FINAL")
            hint = f" (a run dir? its model is {final})" if os.path.isdir(final) else ""
            raise UserError(f"{what} '{name}' holds no model: none of {', '.join(MODEL_DIR_FILES)}{hint}")
        return
    # A hub id is 'name' or 'owner/name'; anything else can only be a local path.
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.exists(name):
        raise UserError(f"{what} '{name}': no such directory")
    cached = any(isinstance(huggingface_hub.try_to_load_from_cache(name, f), str) for f in MODEL_DIR_FILES)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        if not cached:
            raise UserError(f"{what} '{name}' is not a local directory and HF_HUB_OFFLINE=1: "
                            "pass a local path")
        return
    why = _hub_unreachable()
    if why:  # else the hub client spends about a minute in retries before failing
        fix = "rerun with HF_HUB_OFFLINE=1 to load it from the local hub cache" if cached else "pass a local path"
        raise UserError(f"{what} '{name}' is not a local directory and the hub cannot be reached "
                        f"({huggingface_hub.constants.ENDPOINT}: {why}): {fix}")


def _hub_unreachable():
    """Why a TCP connection to the hub endpoint fails within a few seconds, or None when it opens (or
    a proxy is set: then only the hub client itself can tell)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return None
    url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=5).close()
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__
    return None


def check_max_length(m):
    """model.max_length against the positions the model has, before any data is tokenised."""
    if m.name_or_path is not None:
        try:
            config = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
        except (OSError, ValueError):
            return  # loading the model says what is wrong with it
        config = config.to_dict()
    else:
        config = OmegaConf.to_container(m.init_config)
    check_positions(config, m.max_length, m.name_or_path or "model.init_config", "model.max_length")


def check_positions(config: dict, max_length: int, source: str, setting: str):
    """One line if `max_length` is past the model's learned positions (a config.json's dict): the
    first longer text would otherwise stop the run with an IndexError."""
    limit = position_limit(config)
    if limit and max_length > limit:
        raise UserError(f"{setting}={max_length} is more than the {limit} positions of this {config['model_type']} "
                        f"model ({source}): set {setting}={limit} or less")


def convert_gguf(gguf_path: str, cache_root: str) -> str:
    """A GGUF checkpoint -> a safetensors model dir under cache_root, converted once.

    Loading a GGUF dequantises it (about 20 s for 135M parameters) and the result cannot go
    through save_pretrained directly, so the weights are written with safetensors' save_model
    (which handles tied embeddings) next to the config and tokenizer, under a temporary name.
    """
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(gguf_path):
        raise UserError(f"GGUF file '{gguf_path}' does not exist")
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    out = os.path.join(cache_root, stem)
    if atomic.is_complete(out):
        return out
    import safetensors.torch
    folder, name = os.path.split(gguf_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ImportError as err:
        raise UserError(f"loading {name} needs the gguf package: pip install gguf ({err})")
    # The weights are dequantised fp32 now: a leftover gguf quantization_config would make
    # transformers treat the converted model as quantized and refuse to save it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # keep_existing: if another job converted it meanwhile, keep theirs, which may be in use.
    with atomic.write_dir(out, keep_existing=True) as tmp:
        model.config.save_pretrained(tmp)
        safetensors.torch.save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
    return out


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, what: str = "tokenizer"):
    """what: how a path that cannot hold a tokenizer is named in the error (a command-line flag)."""
    _check_local_or_hub(name_or_path, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise UserError(f"cannot load tokenizer '{name_or_path}': {str(err).splitlines()[0]}")
    if tokenizer.pad_token is None:  # decoder tokenizers often ship without one
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer '{name_or_path}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


class AutoModelForBradleyTerry(nn.Module):
    """Wraps an AutoModelForSequenceClassification with num_labels=2; forward returns rewards."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model
        self.lora = None  # peft's LoraModel around hf_model when model.peft.enabled (train/lora.py)
        # Decoder classifiers keep a per-position head called `score`; encoders a `classifier`.
        self.pools_last_token = isinstance(getattr(hf_model, "score", None), nn.Linear)

    @property
    def config(self):
        return self.hf_model.config

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32", pad_token_id=None,
                        attn_implementation=None, trust_remote_code: bool = False,
                        disable_dropout: bool = True):
        _check_local_or_hub(name_or_path, "model")
        kwargs = {"num_labels": 2, "dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code,
                  "use_safetensors": True}  # never unpickle weights
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        # The load report would list the fresh 2-logit head as MISSING: expected for a new reward
        # model, and noise on every run, so only errors are shown while loading.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            hf_model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
        except OSError as err:
            raise UserError(f"cannot load model '{name_or_path}': {str(err).splitlines()[0]}")
        finally:
            hf_logging.set_verbosity(verbosity)
        return cls._finish(hf_model, pad_token_id, disable_dropout)

    @classmethod
    def from_config(cls, config_kwargs: dict, dtype: str = "float32", pad_token_id=None,
                    disable_dropout: bool = True, seed: int = 0):
        """A randomly initialised model from an architecture description (tests, tiny runs)."""
        config = AutoConfig.for_model(**dict(config_kwargs), num_labels=2)
        torch.manual_seed(seed)  # the same tiny model on every process and every run
        hf_model = AutoModelForSequenceClassification.from_config(config, dtype=DTYPES[dtype])
        return cls._finish(hf_model, pad_token_id, disable_dropout)

    @classmethod
    def _finish(cls, hf_model, pad_token_id, disable_dropout):
        if pad_token_id is not None:
            hf_model.config.pad_token_id = pad_token_id
        if disable_dropout:  # dropout halves CPU speed and adds noise to a scalar regression
            for module in hf_model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
                if isinstance(getattr(module, "attention_dropout", None), float):
                    module.attention_dropout = 0.0  # decoders apply this one functionally
            for key, value in vars(hf_model.config).items():  # and keep it off in the saved config
                if "dropout" in key and isinstance(value, float):
                    setattr(hf_model.config, key, 0.0)
        # A reward model never generates: a decoder would otherwise build a KV cache in every forward
        # that nothing reads (and under compile=true, dynamo guarded on each layer's cache slot and
        # recompiled once per layer). Saved with the config, as the dropout is.
        if getattr(hf_model.config, "use_cache", False):
            hf_model.config.use_cache = False
        return cls(hf_model)

    def packing(self):
        """(causal, reward_at) if this model can take packed batches (train/data/packing.py), else
        None. It needs pluggable attention (train/attention.py) and a head we can apply to the
        reward tokens alone: a decoder's per-position `score`, or a BERT-style pooler + classifier."""
        hf = self.hf_model
        if not attention.can_pack(hf):
            return None
        if self.pools_last_token:
            return True, "last"
        if getattr(hf.base_model, "pooler", None) is not None and isinstance(getattr(hf, "classifier", None), nn.Linear):
            return False, "first"
        return None

    def enable_packing(self):
        """Switches attention to train/attention.py's (plain sdpa for padded batches) when the model
        can pack; returns packing()."""
        spec = self.packing()
        if spec is not None:
            self.hf_model.set_attn_implementation(attention.NAME)
            attention.prune_last_layer(self.hf_model)  # its last layer computes only the reward tokens
        return spec

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                reward_index=None, spans=None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if spans is not None:
            return self._packed_forward(input_ids, position_ids, reward_index, spans, extra)
        if not self.pools_last_token:
            logits = self.hf_model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
            return logits[:, 1]
        hidden = self.hf_model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = last_token_index(attention_mask)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.hf_model.score(pooled)[:, 1]

    def _packed_forward(self, input_ids, position_ids, reward_index, spans, extra) -> torch.Tensor:
        """Rewards of one packed row: one forward, then the head on the reward tokens only."""
        spans.calls = 0
        hidden = self.hf_model.base_model(input_ids=input_ids, position_ids=position_ids, spans=spans,
                                          **extra).last_hidden_state
        if spans.calls == 0:  # the model did not hand `spans` to its attention: its rewards would be wrong
            raise UserError(f"{type(self.hf_model).__name__} does not pass keyword arguments to its attention "
                            "layers, so it cannot take packed batches: set packing=false")
        picked = hidden[0, reward_index]
        if self.pools_last_token:
            return self.hf_model.score(picked)[:, 1]
        pooled = self.hf_model.base_model.pooler(picked[:, None])  # BERT's pooler reads position 0
        return self.hf_model.classifier(self.hf_model.dropout(pooled))[:, 1]

    def save_pretrained(self, path: str, state_dict=None, **kwargs):
        """A plain transformers classifier dir. Under LoRA the adapters are merged into the base
        weights first, in place (the model is plain from then on), so the dir loads without peft.
        `state_dict`: this wrapper's full weights when the live ones are sharded (FSDP)."""
        lora.merge(self)
        if state_dict is not None:
            state_dict = {k.removeprefix("hf_model."): v for k, v in state_dict.items()}
        self.hf_model.save_pretrained(path, safe_serialization=True, state_dict=state_dict, **kwargs)


def prepare_tokenizer(cfg):
    """The run's tokenizer; a .gguf model.name_or_path is first pointed at its converted copy
    (converted once under ${cache_dir}/converted), as training and labeling both need."""
    if str(cfg.model.name_or_path or "").endswith(".gguf"):
        cfg.model.name_or_path = convert_gguf(cfg.model.name_or_path, os.path.join(cfg.cache_dir, "converted"))
    tokenizer = load_tokenizer(cfg.model.tokenizer_name_or_path or cfg.model.name_or_path, cfg.model.trust_remote_code)
    check_max_length(cfg.model)
    return tokenizer


def build_model(cfg, tokenizer, model_class=AutoModelForBradleyTerry):
    """The run's model (cfg.model): pretrained from model.name_or_path, or freshly initialised from
    model.init_config (tests, tiny runs); with LoRA adapters when model.peft.enabled (train/lora.py)."""
    m = cfg.model
    if m.name_or_path is None:
        model = model_class.from_config(OmegaConf.to_container(m.init_config), m.dtype,
                                        tokenizer.pad_token_id, m.disable_dropout, cfg.seed)
    else:
        model = model_class.from_pretrained(m.name_or_path, m.dtype, tokenizer.pad_token_id,
                                            m.attn_implementation, m.trust_remote_code, m.disable_dropout)
    if lora.enabled(m):
        lora.apply(model, m.peft)
    if m.activation_checkpointing:
        model.hf_model.gradient_checkpointing_enable()
    return model

