"""PiSSA / OLoRA adapters and the original base weights.

PiSSA and OLoRA initialise an adapter from the base weight and leave the residual
``W - scaling * B0 @ A0`` in the model. An adapter saved as it is only applies to that residual:
loading it recomputes the residual from the original weight (``pissa``, ``olora``), which is
impossible for ``pissa_niter_<K>`` (a randomised SVD), so such files are rejected at load.
``save_pretrained(..., path_initial_model_for_weight_conversion=<initial adapter folder>)``
instead writes the equivalent plain LoRA adapter for the original weights, as PEFT does.
The rules themselves (factors, conversion, settings) are the C++ core's (``torchlora._C.peft``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .._native import _C

if TYPE_CHECKING:  # pragma: no cover
    from ..config import LoraConfig

# (factor A suffix, factor B suffix) of each module kind in PEFT's files
_FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
# init_lora_weights values PEFT's conversion is meant for (it warns for others)
_CONVERTIBLE_PREFIXES = ("pissa", "corda", "olora", "lora_ga", "true")


def check_loadable(config: "LoraConfig", source: str) -> None:
    """Raise ValueError, saying how to convert it, if the adapter's factors apply to base weights
    that its initialisation rewrote in a way loading cannot recompute (``pissa_niter_<K>``)."""
    _C.peft.check_base_weights_reproducible(config.init_lora_weights, source)


def prepare_for_saving(
    tensors: dict[str, Tensor], config_dict: dict[str, Any], path_initial_model_for_weight_conversion: str | None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """What ``save_pretrained`` writes: with ``path_initial_model_for_weight_conversion`` the
    adapter converted for the original base weights, else the adapter as it is (with a warning
    when it could not be loaded again)."""
    if path_initial_model_for_weight_conversion is not None:
        return convert_for_original_weights(tensors, config_dict, path_initial_model_for_weight_conversion)
    init = config_dict.get("init_lora_weights", True)
    try:
        _C.peft.check_base_weights_reproducible(init, "the adapter being saved")
    except ValueError:
        warnings.warn(
            f"init_lora_weights={init!r} rewrote the base weights in a way loading cannot recompute, so this "
            "adapter will not load as it is saved now. Saved before training, it is what "
            "save_pretrained(..., path_initial_model_for_weight_conversion=<this folder>) needs to write a "
            "loadable adapter after training.", UserWarning, stacklevel=3,
        )
    return tensors, config_dict


def convert_for_original_weights(
    tensors: Mapping[str, Tensor], config_dict: Mapping[str, Any], path_initial_model_for_weight_conversion: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """PEFT's conversion of a trained PiSSA / OLoRA (/ CorDA, LoRA-GA) adapter to a plain LoRA
    adapter for the original base weights.

    ``path_initial_model_for_weight_conversion`` is the folder where the adapter was saved right
    after initialisation, before training (its factors A0, B0). With the trained factors A, B:
    ``W_res + s*B@A = W + s*B'@A'`` with ``A' = cat(A, A0)``, ``B' = cat(B, -B0)``; the config gets
    ``r`` doubled, ``lora_alpha`` doubled (times sqrt(2) with rsLoRA) so that the scaling is
    unchanged, ``rank_pattern`` / ``alpha_pattern`` values doubled, ``init_lora_weights=True``.
    Embedding factors convert the same way (their base weights were not rewritten and their
    A0 is zero); other tensors (lora_B.bias, modules_to_save) are kept. The initial folder is
    only read.
    """
    from ..adapter_io import read_adapter_weights

    if config_dict.get("use_rslora") and (config_dict.get("rank_pattern") or config_dict.get("alpha_pattern")):
        raise ValueError(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when "
            "using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`."
        )
    if not str(config_dict.get("init_lora_weights", True)).lower().startswith(_CONVERTIBLE_PREFIXES):
        warnings.warn(
            "`path_initial_model_for_weight_conversion` only works for converting a PiSSA/CorDA/OLoRA/LoRA-GA "
            "adapter to a LoRA adapter", UserWarning, stacklevel=3,
        )
    initial, initial_path = read_adapter_weights(path_initial_model_for_weight_conversion)
    converted = dict(tensors)
    for key_A in tensors:
        for suffix_A, suffix_B in _FACTOR_SUFFIXES:
            if not key_A.endswith(suffix_A):
                continue
            key_B = key_A[: -len(suffix_A)] + suffix_B
            missing = [k for k in (key_A, key_B) if k not in initial]
            if key_B not in tensors or missing:
                raise ValueError(
                    f"{initial_path}: the initial adapter lacks {missing or [key_B]}, which the adapter being saved "
                    "has; pass the folder the same adapter was saved to right after initialisation"
                )
            A, B = tensors[key_A], tensors[key_B]
            try:
                converted[key_A], converted[key_B] = _C.peft.factors_for_original_weights(
                    A, B, initial[key_A].to(A.device), initial[key_B].to(B.device)
                )
            except ValueError as exc:
                raise ValueError(f"{initial_path}: {key_A[: -len(suffix_A)]}: {exc}") from exc
    return converted, _converted_config(config_dict)


def _same_kind(original: Any, value: float) -> int | float:
    """Keep ints ints (PEFT writes ``lora_alpha * 2`` of an int as an int)."""
    return int(value) if isinstance(original, int) and float(value).is_integer() else value


def _converted_config(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    rank_pattern = dict(config_dict.get("rank_pattern") or {})
    alpha_pattern = dict(config_dict.get("alpha_pattern") or {})
    settings = _C.peft.settings_for_original_weights(
        config_dict["r"], float(config_dict["lora_alpha"]), bool(config_dict.get("use_rslora")),
        rank_pattern, {k: float(v) for k, v in alpha_pattern.items()},
    )
    out = dict(config_dict)
    out["init_lora_weights"] = True
    out["r"] = settings["r"]
    out["lora_alpha"] = _same_kind(config_dict["lora_alpha"], settings["lora_alpha"])
    out["rank_pattern"] = dict(settings["rank_pattern"])
    out["alpha_pattern"] = {k: _same_kind(alpha_pattern[k], v) for k, v in settings["alpha_pattern"].items()}
    return out


__all__ = ["check_loadable", "convert_for_original_weights", "prepare_for_saving"]
