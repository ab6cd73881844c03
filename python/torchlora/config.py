"""``LoraConfig``, ``TaskType`` and ``PeftType`` with PEFT's field names, defaults and JSON form.

The config is validated when it is built: every bad value raises ``ValueError`` or ``TypeError``
naming the field, and every PEFT option that torchlora does not implement raises
``NotImplementedError`` when set to anything but its default, so nothing is silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

CONFIG_NAME = "adapter_config.json"
ALL_LINEAR = "all-linear"


class PeftType(str, enum.Enum):
    """The adapter method; torchlora implements LoRA."""

    LORA = "LORA"


class TaskType(str, enum.Enum):
    """The task a model is adapted for; selects the ``PeftModel`` subclass."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# PEFT LoraConfig options torchlora does not implement, with the default PEFT gives them.
# Setting one of them to anything else raises NotImplementedError.
UNSUPPORTED_FIELD_DEFAULTS: dict[str, Any] = {
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "use_dora": False,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "runtime_config": None,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}

# init_lora_weights values PEFT knows but torchlora does not implement.
_UNSUPPORTED_INITS = ("loftq", "eva", "corda", "lora_ga", "orthogonal")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
_BIAS_CHOICES = ("none", "all", "lora_only")
_HUB_KWARGS = frozenset({"token", "cache_dir", "local_files_only", "force_download", "proxies", "user_agent"})
# Keys PEFT writes into adapter_config.json besides the LoraConfig fields.
_BOOKKEEPING_KEYS = ("peft_type", "auto_mapping", "peft_version")


def _is_default(name: str, value: Any) -> bool:
    default = UNSUPPORTED_FIELD_DEFAULTS[name]
    if name == "runtime_config":
        # PEFT's LoraRuntimeConfig(ephemeral_gpu_offload=False), as an object or as a dict
        if value is None:
            return True
        offload = value.get("ephemeral_gpu_offload", False) if isinstance(value, dict) else getattr(
            value, "ephemeral_gpu_offload", None)
        return offload is False and (not isinstance(value, dict) or set(value) <= {"ephemeral_gpu_offload"})
    if name == "loftq_config":
        return value is None or value == {}
    return value == default and type(value) is type(default) or (default is None and value is None)


def _check_str_list(name: str, value: Any, allow_str: bool) -> None:
    if value is None or (allow_str and isinstance(value, str)):
        return
    if isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value):
        return
    kinds = "a string, a list of strings or None" if allow_str else "a list of strings or None"
    raise TypeError(f"{name} must be {kinds}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_opt_str(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string or None, got {value!r}")


def check_rank(name: str, value: Any) -> None:
    """A LoRA rank: a positive int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"`{name}` should be a positive integer value but the value passed is {value}")


def check_alpha(name: str, value: Any) -> None:
    """A LoRA alpha: a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def parse_init_lora_weights(value: Any) -> Union[bool, str]:
    """Validate ``init_lora_weights``; returns it unchanged."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TypeError(f"init_lora_weights must be a bool or a string, got {value!r}")
    if value.lower() == "gaussian" or value in ("pissa", "olora") or _PISSA_NITER.fullmatch(value):
        return value
    if value in _UNSUPPORTED_INITS:
        raise NotImplementedError(f"init_lora_weights={value!r} is not supported by torchlora")
    raise ValueError(
        f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<K>' or 'olora', got {value!r}"
    )


@dataclass
class LoraConfig:
    """The configuration of a LoRA adapter, field for field PEFT's ``LoraConfig``.

    ``target_modules`` (and ``exclude_modules``) is a list of module names or name suffixes, a
    regex matched against the full module name, ``"all-linear"``, or None for the model
    architecture's default. ``rank_pattern`` / ``alpha_pattern`` map regexes to per-module
    ranks / alphas. The scaling of an adapter is ``lora_alpha / r`` (``lora_alpha / sqrt(r)``
    with ``use_rslora``).
    """

    task_type: Optional[Union[str, TaskType]] = None
    peft_type: Optional[Union[str, PeftType]] = None
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    r: int = 8
    target_modules: Optional[Union[list[str], set[str], str]] = None
    exclude_modules: Optional[Union[list[str], set[str], str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    lora_bias: bool = False
    # PEFT options torchlora does not implement: accepted only at their defaults
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    trainable_token_indices: Any = None
    loftq_config: Any = field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    use_dora: bool = False
    velora_config: Any = None
    alora_invocation_tokens: Any = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: Any = None
    runtime_config: Any = None
    target_parameters: Any = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        self._reject_unsupported()
        self._check_task_and_type()
        self._check_types()
        self._check_values()
        self._check_combinations()
        self.peft_type = PeftType.LORA
        # PEFT keeps module lists as sets; order does not matter for matching
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)

    # ------------------------------------------------------------------ validation
    def _reject_unsupported(self) -> None:
        for name in UNSUPPORTED_FIELD_DEFAULTS:
            value = getattr(self, name)
            if not _is_default(name, value):
                raise NotImplementedError(
                    f"LoraConfig.{name}={value!r} is not supported by torchlora (only the default "
                    f"{UNSUPPORTED_FIELD_DEFAULTS[name]!r} is)"
                )
        self.loftq_config = {}
        self.runtime_config = None

    def _check_task_and_type(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise ValueError(
                    f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                    f"{', '.join(t.value for t in TaskType)}."
                ) from None
        if self.peft_type is not None and str(getattr(self.peft_type, "value", self.peft_type)) != "LORA":
            raise ValueError(f"peft_type must be 'LORA' for a LoraConfig, got {self.peft_type!r}")
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            raise TypeError(f"auto_mapping must be a dict or None, got {self.auto_mapping!r}")
        _check_opt_str("peft_version", self.peft_version)

    def _check_types(self) -> None:
        _check_opt_str("base_model_name_or_path", self.base_model_name_or_path)
        _check_opt_str("revision", self.revision)
        for name in ("inference_mode", "fan_in_fan_out", "use_rslora", "lora_bias"):
            _check_bool(name, getattr(self, name))
        _check_str_list("target_modules", self.target_modules, allow_str=True)
        _check_str_list("exclude_modules", self.exclude_modules, allow_str=True)
        _check_str_list("modules_to_save", self.modules_to_save, allow_str=False)
        _check_str_list("layers_pattern", self.layers_pattern, allow_str=True)
        layers = self.layers_to_transform
        if layers is not None:
            items = layers if isinstance(layers, (list, tuple)) else [layers]
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
                raise TypeError(f"layers_to_transform must be an int, a list of ints or None, got {layers!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a dict, got {getattr(self, name)!r}")

    def _check_values(self) -> None:
        check_rank("r", self.r)
        check_alpha("lora_alpha", self.lora_alpha)
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"lora_dropout must be a number, got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")
        if self.bias not in _BIAS_CHOICES:
            raise ValueError(f"bias must be one of {list(_BIAS_CHOICES)}, got {self.bias!r}")
        parse_init_lora_weights(self.init_lora_weights)
        for key, value in self.rank_pattern.items():
            if not isinstance(key, str):
                raise TypeError(f"rank_pattern keys must be strings, got {key!r}")
            check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            if not isinstance(key, str):
                raise TypeError(f"alpha_pattern keys must be strings, got {key!r}")
            check_alpha(f"alpha_pattern[{key!r}]", value)
        for name in ("target_modules", "exclude_modules"):
            pattern = getattr(self, name)
            if isinstance(pattern, str) and pattern.lower() != ALL_LINEAR:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"{name} is not a valid regular expression: {exc}") from None

    def _check_combinations(self) -> None:
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ValueError(
                "The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                f"init_lora_weights={self.init_lora_weights} instead."
            )

    # ------------------------------------------------------------------ PEFT-like helpers
    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The config as a dict, with the keys and value types PEFT writes (sets stay sets)."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out.pop("runtime_config")
        out["loftq_config"] = {}
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in out.items()}

    def to_json_dict(self) -> dict[str, Any]:
        """``to_dict`` with sets written as sorted lists, ready for ``json.dumps``."""
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Build a config from ``to_dict`` output or a PEFT ``adapter_config.json``.

        Keys that neither torchlora nor PEFT's LoraConfig knows raise ``ValueError`` naming them;
        PEFT options torchlora lacks are accepted at their defaults and rejected otherwise.
        """
        if not isinstance(data, dict):
            raise TypeError(f"from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown LoraConfig keys {unknown}; torchlora cannot interpret this config")
        peft_type = data.get("peft_type")
        if peft_type is not None and str(getattr(peft_type, "value", peft_type)) != "LORA":
            raise ValueError(f"peft_type must be 'LORA', got {peft_type!r}: torchlora only implements LoRA")
        return cls(**data)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (created if needed)."""
        from .peft_format import config_to_peft_json, write_adapter_config

        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory ({save_directory}) should be a directory, not a file")
        output = self.to_dict()
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping is not None:
            output["auto_mapping"] = auto_mapping
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        write_adapter_config(save_directory, config_to_peft_json(output))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None,
                        **kwargs: Any) -> "LoraConfig":
        """Read ``adapter_config.json`` from a local folder (``subfolder`` inside it if given)."""
        path = pretrained_model_name_or_path
        if subfolder is not None:
            path = os.path.join(path, subfolder)
        config_file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise ValueError(f"Can't find '{CONFIG_NAME}' at '{path}'")
        with open(config_file, encoding="utf-8") as reader:
            data = json.load(reader)
        data.pop("runtime_config", None)  # runtime-only, PEFT drops it too
        # Hub download options do not apply to a local folder; config fields come from the file,
        # as in PEFT, so passing them here is an error rather than a silent no-op.
        unexpected = sorted(set(kwargs) - _HUB_KWARGS)
        if unexpected:
            raise TypeError(f"from_pretrained got unexpected arguments {unexpected}")
        return cls.from_dict(data)


# torchlora implements one method, so PEFT's generic config entry point is the LoRA config
PeftConfig = LoraConfig
