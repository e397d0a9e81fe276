"""FSDP2: parameters, gradients and optimizer state sharded across processes, one code path for
GPUs and for CPU processes over gloo.

accelerate wraps a model in FSDP only on CUDA devices; on CPU processes it would silently fall back
to DDP. So the harness applies torch's `fully_shard` itself, with the settings of accelerate's FSDP
plugin (the `fsdp_config:` of an accelerate config file, which `accelerate launch` passes on as
FSDP_* environment variables), and never hands a sharded model to `accelerator.prepare`. The same
lines then run on 2 CPU processes in CI (accelerate_config/fsdp_cpu_2proc.yaml) and on GPUs
(accelerate_config/fsdp_4gpu.yaml).

- Each decoder/encoder layer (the model's `_no_split_modules`, or the config's
  fsdp_transformer_layer_cls_to_wrap) is its own FSDP unit, then the whole model.
- mixed_precision bf16: bf16 compute and fp32 gradient reduction over fp32 master weights.
- fsdp_offload_params: parameters and optimizer state live in CPU memory (GPUs only: on CPU
  processes they are there already).
- fsdp_activation_checkpointing: each layer's activations are recomputed in backward.
"""
import os

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from train.errors import UserError


def plugin():
    """accelerate's FSDP plugin read from the environment `accelerate launch` sets, or None when
    the run is not sharded. One line if it asks for something this trainer does not do."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    settings = FullyShardedDataParallelPlugin()
    if settings.fsdp_version != 2:
        raise UserError(f"fsdp_version {settings.fsdp_version} is not supported: set fsdp_version: 2 in the "
                        "accelerate config's fsdp_config (FSDP2, torch's fully_shard)")
    return settings


def shard(model, settings, accelerator) -> None:
    """Shards `model` (an AutoModelForBradleyTerry) in place over all processes: every layer, then
    the whole model. Call it before the optimizer is built, which must see the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = accelerator.device
    model.to(device)
    mesh = init_device_mesh(device.type, (accelerator.num_processes,))
    precision = MixedPrecisionPolicy()
    if accelerator.mixed_precision == "bf16":
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif accelerator.mixed_precision == "fp16":
        raise UserError("mixed_precision fp16 with FSDP is not supported: use bf16 (fp32 master weights)")
    offload = OffloadPolicy()
    if settings.cpu_offload and device.type != "cpu":
        offload = CPUOffloadPolicy(pin_memory=True)
    if settings.activation_checkpointing:
        model.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = set(settings.transformer_cls_names_to_wrap or getattr(model.hf_model, "_no_split_modules", None) or [])
    options = dict(mesh=mesh, reshard_after_forward=settings.reshard_after_forward, mp_policy=precision,
                   offload_policy=offload)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"FSDP: {type(model.hf_model).__name__} has no layers named {sorted(names) or '(none)'} to "
                        "shard one by one: set fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded) tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(value):
    """A sharded or partial scalar (a DTensor) as an ordinary tensor; anything else as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_state_dict(model) -> dict:
    """The whole model's weights gathered on the main process (in CPU memory); empty elsewhere.
    Collective: every process calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
