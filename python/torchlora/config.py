"""``LoraConfig``, ``TaskType`` and ``PeftType`` with PEFT's field names, defaults and JSON form.

The config is validated when it is built: every bad value raises ``ValueError`` or ``TypeError``
naming the field, and every PEFT option that torchlora does not implement raises
``NotImplementedError`` when set to anything but its default, so nothing is silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ._native import _C

CONFIG_NAME = "adapter_config.json"


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


_peft = _C.peft
# PEFT's LoraConfig fields as the C++ core defines them: name -> (default, supported).
_FIELDS: dict[str, tuple[Any, bool]] = {name: (default, supported) for name, default, supported in
                                        _peft.lora_config_fields()}
# PEFT options torchlora does not implement, with PEFT's default: any other value raises
# NotImplementedError.
UNSUPPORTED_FIELD_DEFAULTS: dict[str, Any] = {name: d for name, (d, ok) in _FIELDS.items() if not ok}


def _default(name: str) -> Any:
    """A dataclass field whose default is the C++ schema's."""
    value = _FIELDS[name][0]
    return field(default_factory=lambda: copy.deepcopy(value))


def _plain(value: Any) -> Any:
    """A config value as the schema sees it: enums by value, PEFT's runtime-config object as a dict."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def validate_config_dict(data: dict[str, Any], source: str = "") -> dict[str, Any]:
    """Check a config dict by PEFT's schema (the C++ core's): unknown keys, types, ranges,
    combinations and unsupported options raise ValueError / TypeError / NotImplementedError
    naming the field. Returns the dict with every field present."""
    if not isinstance(data, dict):
        raise TypeError(f"a LoraConfig dict was expected, got {type(data).__name__}")
    return _peft.normalize_lora_config({k: _plain(v) for k, v in data.items()}, source)


@dataclass
class LoraConfig:
    """The configuration of a LoRA adapter, field for field PEFT's ``LoraConfig``.

    ``target_modules`` (and ``exclude_modules``) is a list of module names or name suffixes, a
    regex matched against the full module name, ``"all-linear"``, or None for the model
    architecture's default. ``rank_pattern`` / ``alpha_pattern`` map regexes to per-module
    ranks / alphas. The scaling of an adapter is ``lora_alpha / r`` (``lora_alpha / sqrt(r)``
    with ``use_rslora``).
    """

    task_type: Optional[Union[str, TaskType]] = _default("task_type")
    peft_type: Optional[Union[str, PeftType]] = _default("peft_type")
    auto_mapping: Optional[dict] = _default("auto_mapping")
    peft_version: Optional[str] = _default("peft_version")
    base_model_name_or_path: Optional[str] = _default("base_model_name_or_path")
    revision: Optional[str] = _default("revision")
    inference_mode: bool = _default("inference_mode")
    r: int = _default("r")
    target_modules: Optional[Union[list[str], set[str], str]] = _default("target_modules")
    exclude_modules: Optional[Union[list[str], set[str], str]] = _default("exclude_modules")
    lora_alpha: float = _default("lora_alpha")
    lora_dropout: float = _default("lora_dropout")
    fan_in_fan_out: bool = _default("fan_in_fan_out")
    bias: str = _default("bias")
    use_rslora: bool = _default("use_rslora")
    modules_to_save: Optional[list[str]] = _default("modules_to_save")
    init_lora_weights: Union[bool, str] = _default("init_lora_weights")
    layers_to_transform: Optional[Union[list[int], int]] = _default("layers_to_transform")
    layers_pattern: Optional[Union[list[str], str]] = _default("layers_pattern")
    rank_pattern: dict = _default("rank_pattern")
    alpha_pattern: dict = _default("alpha_pattern")
    lora_bias: bool = _default("lora_bias")
    # PEFT options torchlora does not implement: accepted only at their defaults
    megatron_config: Optional[dict] = _default("megatron_config")
    megatron_core: Optional[str] = _default("megatron_core")
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = _default("trainable_token_indices")
    loftq_config: Any = _default("loftq_config")
    eva_config: Any = _default("eva_config")
    corda_config: Any = _default("corda_config")
    lora_ga_config: Any = _default("lora_ga_config")
    use_dora: bool = _default("use_dora")
    velora_config: Any = _default("velora_config")
    alora_invocation_tokens: Any = _default("alora_invocation_tokens")
    use_qalora: bool = _default("use_qalora")
    qalora_group_size: int = _default("qalora_group_size")
    monteclora_config: Any = _default("monteclora_config")
    layer_replication: Any = _default("layer_replication")
    runtime_config: Any = _default("runtime_config")
    target_parameters: Optional[list[str]] = _default("target_parameters")
    use_bdlora: Any = _default("use_bdlora")
    arrow_config: Any = _default("arrow_config")
    kasa_config: Any = _default("kasa_config")
    ensure_weight_tying: bool = _default("ensure_weight_tying")

    # LoRA layer classes for module types torchlora does not wrap itself (not a field: never saved)
    _custom_modules = None

    def __post_init__(self) -> None:
        validate_config_dict({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        self.peft_type = PeftType.LORA
        if self.task_type is not None:
            self.task_type = TaskType(self.task_type)
        self.loftq_config = {}
        self.runtime_config = None
        # PEFT keeps module lists as sets; order does not matter for matching
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)

    # ------------------------------------------------------------------ PEFT-like helpers
    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    def _register_custom_module(self, mapping: dict[type, type]) -> None:
        """Experimental, as in PEFT: wrap target modules of type ``T`` with the LoRA layer class
        ``mapping[T]`` (checked before torchlora's own layer types, first match wins).

        The class must subclass :class:`torchlora.LoraLayer`; ``get_peft_model`` builds it as
        torchlora's own layers are built: ``cls(module, adapter_name, r=..., lora_alpha=...,
        lora_dropout=..., init_lora_weights=..., use_rslora=..., lora_bias=...,
        low_cpu_mem_usage=..., use_dora=...)``. The mapping lives on this config object only.
        """
        from .nn import LoraLayer

        if not isinstance(mapping, dict):
            raise TypeError(f"_register_custom_module takes a dict {{module type: LoRA layer class}}, got "
                            f"{type(mapping).__name__}")
        for module_type, layer_cls in mapping.items():
            if not isinstance(module_type, type):
                raise TypeError(f"_register_custom_module: the key {module_type!r} is not a module type")
            if not (isinstance(layer_cls, type) and issubclass(layer_cls, LoraLayer)):
                raise TypeError(f"_register_custom_module: the LoRA layer for {module_type.__name__} must be a "
                                f"subclass of torchlora.LoraLayer, got {layer_cls!r}")
        self._custom_modules = {**(self._custom_modules or {}), **mapping}

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

        Keys that PEFT's LoraConfig does not know raise ``ValueError`` naming them; PEFT
        options torchlora lacks are accepted at their defaults and rejected otherwise.
        """
        validate_config_dict(data)
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
        """Read ``adapter_config.json`` from a local folder or a Hub repository id (``subfolder``
        inside it if given). Keywords are ``huggingface_hub.hf_hub_download``'s (``revision``,
        ``token``, ``cache_dir``, ``local_files_only``, ``force_download``, ...); config fields
        come from the file, as in PEFT, so passing them here is an error."""
        from .hub import resolve_adapter_config, split_hub_kwargs

        hub_kwargs, unexpected = split_hub_kwargs(kwargs)
        if unexpected:
            raise TypeError(f"from_pretrained got unexpected arguments {sorted(unexpected)}")
        config_file = resolve_adapter_config(pretrained_model_name_or_path, subfolder, **hub_kwargs)
        return cls(**_peft.read_adapter_config(config_file))

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload ``adapter_config.json`` to the Hub repository ``repo_id`` (created if needed)
        through ``huggingface_hub``; keywords as :func:`torchlora.hub.push_to_hub`."""
        from .hub import push_to_hub

        return push_to_hub(self.save_pretrained, repo_id, **kwargs)


# torchlora implements one method, so PEFT's generic config entry point is the LoRA config
PeftConfig = LoraConfig
