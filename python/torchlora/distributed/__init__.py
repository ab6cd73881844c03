"""Training LoRA models across processes with tensor parallelism (DTensor).

Importing this package registers the sharding rules of the ``torch.ops.torchlora`` operators
with DTensor (when this torch build has ``torch.distributed.tensor``); the LoRA layers also
register them the first time they meet a DTensor.
"""

from .sharding_rules import dtensor_available, register_sharding_rules
from .tensor_parallel import (
    TP_STYLES,
    broadcast_replicated_factors,
    lora_embedding_on_mesh,
    lora_linear_on_mesh,
    lora_tp_plan,
    parallelize_lora,
    shard_adapters_like_base,
    transformers_tp_mesh,
)

register_sharding_rules()

__all__ = [
    "TP_STYLES",
    "broadcast_replicated_factors",
    "dtensor_available",
    "lora_embedding_on_mesh",
    "lora_linear_on_mesh",
    "lora_tp_plan",
    "parallelize_lora",
    "register_sharding_rules",
    "shard_adapters_like_base",
    "transformers_tp_mesh",
]
