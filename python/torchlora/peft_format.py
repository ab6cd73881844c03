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

from ._native import _C

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
SAFETENSORS_METADATA = {"format": "pt"}

# PEFT's key names, config keys and config schema are the C++ core's (torchlora/peft/*.h), so
# that Python and a C++ server read and write the same files.
_peft = _C.peft
PEFT_KEY_PREFIX: str = _peft.PEFT_KEY_PREFIX
# The tensors of one LoRA layer under PEFT's local names; in a model each container
# (lora_A, ...) holds one entry per adapter, in a file the adapter name is left out.
LORA_TENSOR_NAMES: tuple[str, ...] = tuple(_peft.LORA_TENSOR_NAMES)
# The keys adapter_config.json may hold, and those written even at their default (PEFT has read
# them since about 0.10; older PEFT refuses keys it does not know, so a file that uses no newer
# feature loads in old and new PEFT alike).
PEFT_LORA_CONFIG_KEYS, PEFT_BASELINE_KEYS = _peft.peft_file_keys()


# ---------------------------------------------------------------------------------- keys
def to_peft_key(module_key: str, adapter_name: str, with_prefix: bool = True) -> str:
    """The key of a tensor in a PEFT file, from its key in the adapted model's state dict.

    ``<path>.lora_A.<adapter>.weight`` -> ``base_model.model.<path>.lora_A.weight`` and
    ``<path>.lora_embedding_A.<adapter>`` -> ``base_model.model.<path>.lora_embedding_A``. Keys
    that are not LoRA tensors (modules_to_save copies keyed as the plain module, biases, embedding
    layers) only get the prefix. ``with_prefix=False`` leaves out ``base_model.model.``, as PEFT
    does for a model from ``inject_adapter_in_model``.
    """
    return _peft.to_peft_key(module_key, adapter_name, with_prefix)


def from_peft_key(peft_key: str, adapter_name: str) -> str:
    """The inverse of ``to_peft_key``: a file key (with or without ``base_model.model.``) -> the
    key in the adapted model's state dict, with ``adapter_name`` put back into LoRA tensor keys."""
    return _peft.from_peft_key(peft_key, adapter_name)


# ---------------------------------------------------------------------------------- paths
def adapter_folder(save_directory: str | os.PathLike[str], adapter_name: str) -> str:
    """The folder of one adapter: ``save_directory`` for "default", else ``<dir>/<name>``."""
    directory = os.fspath(save_directory)
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


# ---------------------------------------------------------------------------------- config JSON
def config_to_peft_json(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The ``adapter_config.json`` content for a LoRA config given as a dict of its fields.

    The one writer of that content (the C++ core's, which C++ servers use too):
    ``LoraConfig.save_pretrained`` and ``PeftModel.save_pretrained`` both go through it. Keeps
    only keys PEFT knows, writes sets as lists, sets ``peft_type`` to "LORA", and leaves out keys
    outside ``PEFT_BASELINE_KEYS`` whose value equals their default.
    """
    return json.loads(_peft.lora_config_to_peft_json(dict(config_dict)))


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
    """Parse and validate ``<directory>/adapter_config.json`` by the C++ core's reader (so Python
    and C++ accept the same files); every field present, errors name the file and the key."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isdir(os.fspath(directory)):
        raise FileNotFoundError(f"adapter folder {os.fspath(directory)!r} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} in the adapter folder")
    return _peft.read_adapter_config(path)


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

    Every tensor must be floating point and finite (the C++ core's check, as in C++ servers).
    """
    path = adapter_weights_path(directory)
    tensors = _read_safetensors(path) if path.endswith(".safetensors") else _read_pickle(path)
    if not tensors:
        raise ValueError(f"{path}: the file holds no tensors")
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_KEY_PREFIX):
            raise ValueError(f"{path}: key {key!r} does not start with {PEFT_KEY_PREFIX!r}")
        _peft.check_adapter_tensor(tensor, key, path)
    return tensors, path


def check_adapter_file(
    path: str, tensors: Mapping[str, Tensor], required: Collection[str], optional: Collection[str] = ()
) -> None:
    """Check a file's keys and values against what an adapter holds, strictly.

    ``required`` are the adapter's keys (the file must have each), ``optional`` keys the file may
    have besides (the base embedding layers PEFT saves with some adapters). Raises ValueError
    naming ``path`` and the key for a key that matches nothing and a required key the file
    lacks. Values are checked when read (``read_adapter_weights``), shapes where the tensors
    are loaded.
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
