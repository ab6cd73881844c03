"""PEFT's adapter folder format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only the files: names, the JSON form of a config, tensor files and the mapping between the keys
of a model's state dict and the keys in a file. Nothing here knows about models: the lifecycle
(``PeftModel.from_pretrained``, ``load_adapter``, ``save_pretrained``) lives in ``peft_model.py``
and calls into this module.

The files are exactly what PEFT writes and reads, so an adapter trained with either library
loads in the other. Where PEFT only warns (keys that match nothing, tensors the file lacks),
torchlora raises an error naming the file and the key.

Writing is crash-safe: every file goes to a temporary file in the same folder, is fsynced and
then renamed into place. A folder is only loadable while its ``adapter_config.json`` exists, so
a save removes the old config first, writes the weights, and writes the new config last: an
interrupted save leaves either the old adapter, a folder that refuses to load, or the new
adapter — never new weights under an old config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import tempfile
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save_bytes
from torch import Tensor

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
PEFT_KEY_PREFIX = "base_model.model."
SAFETENSORS_METADATA = {"format": "pt"}

# The tensors of one LoRA layer under PEFT's local names; in a model each container
# (lora_A, ...) holds one entry per adapter, in a file the adapter name is left out.
LORA_TENSOR_NAMES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B")

# Every key of a LoRA adapter_config.json that PEFT (0.21) knows; torchlora writes nothing else.
PEFT_LORA_CONFIG_KEYS = frozenset(
    {
        "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping",
        "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying", "eva_config",
        "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "kasa_config",
        "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config",
        "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config",
        "megatron_core", "modules_to_save", "monteclora_config", "peft_type", "peft_version",
        "qalora_group_size", "r", "rank_pattern", "revision", "target_modules",
        "target_parameters", "task_type", "trainable_token_indices", "use_bdlora", "use_dora",
        "use_qalora", "use_rslora", "velora_config",
    }
)  # fmt: skip

# The keys PEFT has read for a long time (since about 0.10). Older PEFT versions refuse configs
# with keys they do not know, so newer keys are written only when they differ from their default:
# a file that uses no newer feature then loads in old and new PEFT alike.
PEFT_BASELINE_KEYS = frozenset(
    {
        "peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision",
        "inference_mode", "r", "target_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
        "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform",
        "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core",
        "loftq_config", "use_dora", "layer_replication",
    }
)  # fmt: skip


# ---------------------------------------------------------------------------------- keys
def to_peft_key(module_key: str, adapter_name: str, with_prefix: bool = True) -> str:
    """The key of a tensor in a PEFT file, from its key in the adapted model's state dict.

    ``<path>.lora_A.<adapter>.weight`` -> ``base_model.model.<path>.lora_A.weight`` and
    ``<path>.lora_embedding_A.<adapter>`` -> ``base_model.model.<path>.lora_embedding_A``. Keys
    that are not LoRA tensors (modules_to_save copies keyed as the plain module, biases, embedding
    layers) only get the prefix. ``with_prefix=False`` leaves out ``base_model.model.``, as PEFT
    does for a model from ``inject_adapter_in_model``.
    """
    for local in LORA_TENSOR_NAMES:
        container, _, param = local.partition(".")
        named = f"{container}.{adapter_name}" + (f".{param}" if param else "")
        if module_key == named or module_key.endswith("." + named):
            module_key = module_key[: len(module_key) - len(named)] + local
            break
    return PEFT_KEY_PREFIX + module_key if with_prefix else module_key


def from_peft_key(peft_key: str, adapter_name: str) -> str:
    """The inverse of ``to_peft_key``: a file key (with or without ``base_model.model.``) -> the
    key in the adapted model's state dict, with ``adapter_name`` put back into LoRA tensor keys."""
    key = peft_key[len(PEFT_KEY_PREFIX):] if peft_key.startswith(PEFT_KEY_PREFIX) else peft_key
    for local in LORA_TENSOR_NAMES:
        if key == local or key.endswith("." + local):
            container, _, param = local.partition(".")
            return key[: len(key) - len(local)] + f"{container}.{adapter_name}" + (f".{param}" if param else "")
    return key


# ---------------------------------------------------------------------------------- paths
def adapter_folder(save_directory: str | os.PathLike[str], adapter_name: str) -> str:
    """The folder of one adapter: ``save_directory`` for "default", else ``<dir>/<name>``."""
    directory = os.fspath(save_directory)
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


# ---------------------------------------------------------------------------------- config JSON
def _to_json_value(value: Any) -> Any:
    """JSON form of a config value: sets (and tuples) become sorted lists, like PEFT writes them."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, (tuple, list)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    if hasattr(value, "value") and hasattr(type(value), "__members__"):  # Enum (TaskType, ...)
        return value.value
    return value


def _lora_config_defaults() -> dict[str, Any]:
    """Default value of every ``LoraConfig`` field (the config schema, not a model)."""
    from .config import LoraConfig

    out: dict[str, Any] = {}
    for f in dataclasses.fields(LoraConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def config_to_peft_json(
    config_dict: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``adapter_config.json`` content for a LoRA config given as a dict of its fields.

    The one writer of that content: ``LoraConfig.save_pretrained`` and
    ``PeftModel.save_pretrained`` both go through it. Keeps only keys PEFT knows, writes sets as
    lists, and sets ``peft_type`` to "LORA". Keys outside ``PEFT_BASELINE_KEYS`` whose value
    equals their default (``defaults``, else ``LoraConfig``'s) are left out.
    """
    defaults = _lora_config_defaults() if defaults is None else defaults
    out = {
        key: _to_json_value(value)
        for key, value in config_dict.items()
        if key in PEFT_LORA_CONFIG_KEYS
        and (key in PEFT_BASELINE_KEYS or key not in defaults or _to_json_value(value) != _to_json_value(defaults[key]))
    }
    out.pop("peft_version", None)
    out["peft_type"] = "LORA"
    return out


def _config_bytes(config_json: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(config_json), indent=2, sort_keys=True).encode("utf-8")


# ---------------------------------------------------------------------------------- writing
def _fsync_directory(directory: str) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync, then rename over it.

    ``write`` receives a binary file object. Readers see either the old file or the complete new
    one; on any error the temporary file is removed and the old file is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_directory(directory)


def _remove_durably(path: str) -> None:
    if os.path.lexists(path):
        os.remove(path)
        _fsync_directory(os.path.dirname(os.path.abspath(path)))


def _make_folder(directory: str | os.PathLike[str]) -> str:
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise ValueError(f"save directory {directory!r} is a file, expected a folder")
    os.makedirs(directory, exist_ok=True)
    return directory


def write_adapter_config(directory: str | os.PathLike[str], config_json: Mapping[str, Any]) -> None:
    """Write ``<directory>/adapter_config.json`` atomically (the folder is created if needed)."""
    directory = _make_folder(directory)
    payload = _config_bytes(config_json)
    atomic_write(os.path.join(directory, CONFIG_NAME), lambda handle: handle.write(payload))


def _serialize_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies that share no storage (safetensors refuses shared memory)."""
    out: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"state dict value for {key!r} must be a Tensor, got {type(tensor).__name__}")
        if tensor.is_meta:
            raise ValueError(f"tensor {key!r} is on the meta device (never loaded); there is nothing to save")
        out[key] = tensor.detach().to("cpu").contiguous().clone()
    return out


def write_adapter_files(
    directory: str | os.PathLike[str],
    config_json: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    safe_serialization: bool = True,
) -> None:
    """Write one adapter folder crash-safely (see the module docstring for the order)."""
    directory = _make_folder(directory)
    config_payload = _config_bytes(config_json)
    tensors = _serialize_tensors(tensors)

    config_path = os.path.join(directory, CONFIG_NAME)
    weights_name = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    stale_name = WEIGHTS_NAME if safe_serialization else SAFETENSORS_WEIGHTS_NAME

    # 1. the folder stops being loadable as the old adapter
    _remove_durably(config_path)
    # 2. the weights; a weights file in the other format would be picked up by readers instead
    if safe_serialization:
        payload = safetensors_save_bytes(tensors, metadata=dict(SAFETENSORS_METADATA))
        atomic_write(os.path.join(directory, weights_name), lambda handle: handle.write(payload))
    else:
        atomic_write(os.path.join(directory, weights_name), lambda handle: torch.save(tensors, handle))
    _remove_durably(os.path.join(directory, stale_name))
    # 3. the config last: from now on the folder loads as the new adapter
    atomic_write(config_path, lambda handle: handle.write(config_payload))


# ---------------------------------------------------------------------------------- reading
def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse ``<directory>/adapter_config.json``; errors name the file and the bad key."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isdir(os.fspath(directory)):
        raise FileNotFoundError(f"adapter folder {os.fspath(directory)!r} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} in the adapter folder")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ValueError(f"{path}: key 'peft_type' is missing")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"{path}: key 'peft_type' is {peft_type!r}; torchlora reads only LORA adapters")
    for key in ("r", "lora_alpha"):
        if key in data and (isinstance(data[key], bool) or not isinstance(data[key], (int, float))):
            raise ValueError(f"{path}: key {key!r} must be a number, got {data[key]!r}")
    return data


def adapter_weights_path(directory: str | os.PathLike[str]) -> str:
    """The weights file of an adapter folder: safetensors if present, else the legacy pickle."""
    directory = os.fspath(directory)
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{directory}: no adapter weights (expected {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME})"
    )


def _read_safetensors(path: str) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    key = None
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        where = f" (key {key!r})" if key is not None else ""
        raise ValueError(f"{path}: malformed or truncated safetensors file{where}: {exc}") from exc
    return tensors


def _read_pickle(path: str) -> dict[str, Tensor]:
    try:
        # weights_only: a pickle may run arbitrary code, so only tensors and containers are allowed
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError, AttributeError, TypeError) as exc:
        raise ValueError(f"{path}: cannot read the weights file: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(f"{path}: entry {key!r} is not a named tensor")
    return data


def read_adapter_weights(directory: str | os.PathLike[str]) -> tuple[dict[str, Tensor], str]:
    """Load the tensors of an adapter folder (on CPU) and return them with the file path.

    Non-floating tensors are refused: every LoRA/modules_to_save tensor is floating point.
    """
    path = adapter_weights_path(directory)
    tensors = _read_safetensors(path) if path.endswith(".safetensors") else _read_pickle(path)
    if not tensors:
        raise ValueError(f"{path}: the file holds no tensors")
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_KEY_PREFIX):
            raise ValueError(f"{path}: key {key!r} does not start with {PEFT_KEY_PREFIX!r}")
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{path}: key {key!r} has dtype {tensor.dtype}, expected a floating point tensor")
    return tensors, path


def check_adapter_file(
    path: str, tensors: Mapping[str, Tensor], required: Collection[str], optional: Collection[str] = ()
) -> None:
    """Check a file's keys and values against what an adapter holds, strictly.

    ``required`` are the adapter's keys (the file must have each), ``optional`` keys the file may
    have besides (the base embedding layers PEFT saves with some adapters). Raises ValueError
    naming ``path`` and the key for a key that matches nothing, a required key the file lacks,
    and a tensor with non-finite values. Shapes are checked where the tensors are loaded.
    """
    unexpected = [key for key in tensors if key not in required and key not in optional]
    if unexpected:
        raise ValueError(
            f"{path}: key {unexpected[0]!r} matches no adapter parameter of the model"
            + (f" ({len(unexpected) - 1} more unmatched keys)" if len(unexpected) > 1 else "")
        )
    missing = [key for key in required if key not in tensors]
    if missing:
        raise ValueError(
            f"{path}: the file lacks key {missing[0]!r} that the adapter config targets"
            + (f" ({len(missing) - 1} more missing keys)" if len(missing) > 1 else "")
        )
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: key {key!r} holds non-finite values")


__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "PEFT_KEY_PREFIX",
    "LORA_TENSOR_NAMES",
    "PEFT_LORA_CONFIG_KEYS",
    "PEFT_BASELINE_KEYS",
    "to_peft_key",
    "from_peft_key",
    "adapter_folder",
    "config_to_peft_json",
    "atomic_write",
    "write_adapter_config",
    "write_adapter_files",
    "read_adapter_config",
    "adapter_weights_path",
    "read_adapter_weights",
    "check_adapter_file",
]
