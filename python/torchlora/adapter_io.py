"""PEFT-compatible adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

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

import json
import math
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save_bytes
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from .peft_model import PeftModel

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
PEFT_KEY_PREFIX = "base_model.model."
SAFETENSORS_METADATA = {"format": "pt"}

# Every key of a LoRA adapter_config.json that PEFT (0.21) knows. Older PEFT versions reject
# unknown keys, so torchlora writes nothing outside this set.
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

# Keys PEFT writes for features torchlora does not implement. Reading a file is fine while they
# hold these "off" values; any other value is refused rather than silently ignored.
_UNSUPPORTED_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "use_qalora": (False, None),
    "use_bdlora": (False, None, {}),
    "layer_replication": (None, []),
    "loftq_config": (None, {}),
    "eva_config": (None, {}),
    "corda_config": (None, {}),
    "lora_ga_config": (None, {}),
    "kasa_config": (None, {}, False),
    "arrow_config": (None, {}),
    "monteclora_config": (None, {}),
    "velora_config": (None, {}),
    "alora_invocation_tokens": (None, []),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "megatron_config": (None, {}),
}
# Keys that carry no meaning for torchlora's model (bookkeeping, distributed-training options).
_IGNORED_KEYS = frozenset(
    {"peft_type", "peft_version", "auto_mapping", "megatron_core", "qalora_group_size", "ensure_weight_tying"}
)


# ---------------------------------------------------------------------------------- paths
def adapter_folder(save_directory: str | os.PathLike[str], adapter_name: str) -> str:
    """The folder of one adapter: ``save_directory`` for "default", else ``<dir>/<name>``."""
    directory = os.fspath(save_directory)
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


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


def _to_json_value(value: Any) -> Any:
    """JSON form of a config value: sets (and tuples) become sorted lists, like PEFT writes them."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, tuple):
        return [_to_json_value(v) for v in value]
    if isinstance(value, list):
        return [_to_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    if hasattr(value, "value") and hasattr(type(value), "__members__"):  # Enum (TaskType, ...)
        return value.value
    return value


def config_to_peft_json(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The ``adapter_config.json`` content for a LoRA config given as a dict of its fields.

    Keeps only keys PEFT knows, writes sets as lists, and sets ``peft_type`` to "LORA".
    """
    out = {key: _to_json_value(value) for key, value in config_dict.items() if key in PEFT_LORA_CONFIG_KEYS}
    out.pop("peft_version", None)
    out["peft_type"] = "LORA"
    return out


def _serialize_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies that share no storage (safetensors refuses shared memory)."""
    out: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"state dict value for {key!r} must be a Tensor, got {type(tensor).__name__}")
        out[key] = tensor.detach().to("cpu").contiguous().clone()
    return out


def write_adapter_files(
    directory: str | os.PathLike[str],
    config_json: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    safe_serialization: bool = True,
) -> None:
    """Write one adapter folder crash-safely (see the module docstring for the order)."""
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise ValueError(f"save directory {directory!r} is a file, expected a folder")
    os.makedirs(directory, exist_ok=True)
    config_text = json.dumps(dict(config_json), indent=2, sort_keys=True)
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
    atomic_write(config_path, lambda handle: handle.write(config_text.encode("utf-8")))


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


def lora_config_kwargs(config_json: Mapping[str, Any], known_fields: Iterable[str], source: str) -> dict[str, Any]:
    """Keyword arguments for torchlora's ``LoraConfig`` from an ``adapter_config.json`` dict.

    ``known_fields`` are the config's field names. PEFT-only keys are accepted while they hold
    their "off" value; an enabled feature torchlora lacks, or a key nobody knows, is an error
    naming ``source`` and the key.
    """
    known = set(known_fields)
    kwargs: dict[str, Any] = {}
    for key, value in config_json.items():
        if key in known and key not in ("peft_type", "peft_version"):
            kwargs[key] = value
        elif key in _IGNORED_KEYS:
            continue
        elif key in _UNSUPPORTED_OFF_VALUES:
            if value not in _UNSUPPORTED_OFF_VALUES[key]:
                raise ValueError(f"{source}: key {key!r} = {value!r} needs a PEFT feature torchlora does not support")
        else:
            raise ValueError(f"{source}: unknown key {key!r}")
    if "target_modules" in kwargs and isinstance(kwargs["target_modules"], list):
        kwargs["target_modules"] = set(kwargs["target_modules"])
    if "modules_to_save" in kwargs and isinstance(kwargs["modules_to_save"], tuple):
        kwargs["modules_to_save"] = list(kwargs["modules_to_save"])
    return kwargs


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


def check_adapter_weights(
    path: str, loaded: Mapping[str, Tensor], expected: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Match a file's tensors against the model's expected adapter tensors, strictly.

    Returns the file's tensors cast to the dtype (and moved to the device) of the expected
    ones. Raises ValueError naming ``path`` and the key for keys that match nothing, expected
    keys the file lacks, shapes that differ, and non-finite values.
    """
    unexpected = [key for key in loaded if key not in expected]
    if unexpected:
        raise ValueError(
            f"{path}: key {unexpected[0]!r} matches no adapter parameter of the model"
            + (f" ({len(unexpected) - 1} more unmatched keys)" if len(unexpected) > 1 else "")
        )
    missing = [key for key in expected if key not in loaded]
    if missing:
        raise ValueError(
            f"{path}: the file lacks key {missing[0]!r} that the adapter config targets"
            + (f" ({len(missing) - 1} more missing keys)" if len(missing) > 1 else "")
        )
    out: dict[str, Tensor] = {}
    for key, target in expected.items():
        tensor = loaded[key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"{path}: key {key!r} has shape {tuple(tensor.shape)} but the module expects {tuple(target.shape)}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: key {key!r} holds non-finite values")
        out[key] = tensor.to(device=target.device, dtype=target.dtype)
    return out


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "PEFT_LORA_CONFIG_KEYS",
    "adapter_folder",
    "atomic_write",
    "config_to_peft_json",
    "write_adapter_files",
    "read_adapter_config",
    "read_adapter_weights",
    "adapter_weights_path",
    "lora_config_kwargs",
    "check_adapter_weights",
    "save_pretrained",
    "load_adapter",
    "from_pretrained",
]
