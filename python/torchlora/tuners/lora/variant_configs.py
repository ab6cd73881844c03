"""PEFT's sub-configurations of ``LoraConfig`` for the LoRA variants and initialisations that
torchlora does not implement (field names and defaults as in PEFT).

They exist so that code written for PEFT imports; handing one to ``LoraConfig`` raises
``NotImplementedError`` naming the field, from the C++ config schema (the one definition of
which values torchlora supports). ``LoraRuntimeConfig()`` at its default is accepted, as the
schema accepts PEFT's default runtime config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class LoraRuntimeConfig:
    """Runtime options of a LoRA model (never saved). torchlora accepts only the default:
    ``ephemeral_gpu_offload=True`` is not supported."""

    ephemeral_gpu_offload: bool = False


@dataclass
class LoftQConfig:
    """LoftQ initialisation (``LoraConfig(loftq_config=...)``); not implemented by torchlora."""

    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclass
class EvaConfig:
    """EVA data-driven initialisation (``LoraConfig(eva_config=...)``); not implemented by torchlora."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True


@dataclass
class LoraGAConfig:
    """LoRA-GA gradient-based initialisation (``LoraConfig(lora_ga_config=...)``); not implemented by torchlora."""

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: int = 16


@dataclass
class VeloraConfig:
    """VeLoRA activation compression (``LoraConfig(velora_config=...)``); not implemented by torchlora."""

    num_groups: int = 64
    scale: float = 1.0
    init_type: str = "batch_average"


@dataclass
class ArrowConfig:
    """Arrow routing between task adapters (``LoraConfig(arrow_config=...)``); not implemented by torchlora."""

    top_k: int = 3
    router_temperature: float = 1.0
    use_gks: bool = False
    task_adapter_names: Optional[list[str]] = None
    gks_adapter_names: Optional[list[str]] = None
    rng_seed: Optional[int] = None


@dataclass
class BdLoraConfig:
    """Block-diagonal LoRA (``LoraConfig(use_bdlora=...)``); not implemented by torchlora."""

    target_modules_bd_a: Optional[list[str]] = None
    target_modules_bd_b: Optional[list[str]] = None
    nblocks: int = 1
    match_strict: bool = True


@dataclass
class KasaConfig:
    """KaSA singular-value adaptation (``LoraConfig(kasa_config=...)``); not implemented by torchlora."""

    beta: float = 1e-4
    gamma: float = 1e-3


@dataclass
class MontecloraConfig:
    """MonteCLoRA sampling (``LoraConfig(monteclora_config=...)``); not implemented by torchlora."""

    num_samples: int = 8
    use_entropy: bool = False
    dirichlet_prior: float = 0.1
    sample_scaler: float = 1e-4
    kl_loss_weight: float = 1e-5
    buffer_size: int = 150


__all__ = ["ArrowConfig", "BdLoraConfig", "EvaConfig", "KasaConfig", "LoftQConfig", "LoraGAConfig",
           "LoraRuntimeConfig", "MontecloraConfig", "VeloraConfig"]
