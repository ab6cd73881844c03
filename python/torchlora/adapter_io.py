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
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save_bytes
from torch import Tensor, nn

from .tuners.weight_conversion import check_loadable, prepare_for_saving

if TYPE_CHECKING:  # pragma: no cover
    from .config import LoraConfig
    from .peft_model import PeftModel

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
PEFT_KEY_PREFIX = "base_model.model."
SAFETENSORS_METADATA = {"format": "pt"}

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


def config_to_peft_json(
    config_dict: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``adapter_config.json`` content for a LoRA config given as a dict of its fields.

    Keeps only keys PEFT knows, writes sets as lists, and sets ``peft_type`` to "LORA". Keys
    outside ``PEFT_BASELINE_KEYS`` whose value equals ``defaults[key]`` are left out.
    """
    defaults = defaults or {}
    out = {
        key: _to_json_value(value)
        for key, value in config_dict.items()
        if key in PEFT_LORA_CONFIG_KEYS
        and (key in PEFT_BASELINE_KEYS or key not in defaults or _to_json_value(value) != _to_json_value(defaults[key]))
    }
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


def config_from_json(config_json: Mapping[str, Any], source: str) -> "LoraConfig":
    """torchlora's ``LoraConfig`` from an ``adapter_config.json`` dict; errors name ``source``."""
    from .config import LoraConfig

    data = {key: value for key, value in config_json.items() if key != "runtime_config"}
    try:
        return LoraConfig.from_dict(data)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise ValueError(f"{source}: {exc}") from exc


# ---------------------------------------------------------------------------------- models
_SAVE_KWARGS = frozenset({"is_main_process", "save_embedding_layers", "state_dict"})
_LOAD_KWARGS = frozenset({"subfolder", "torch_device", "autocast_adapter_dtype"})


def _check_kwargs(kwargs: Mapping[str, Any], allowed: frozenset[str], function: str) -> None:
    unexpected = sorted(set(kwargs) - allowed)
    if unexpected:
        raise TypeError(f"{function}() got unexpected arguments {unexpected} (supported: {sorted(allowed)})")


def save_pretrained(
    peft_model: "PeftModel",
    save_directory: str | os.PathLike[str],
    selected_adapters: list[str] | None = None,
    safe_serialization: bool = True,
    path_initial_model_for_weight_conversion: str | None = None,
    **kwargs: Any,
) -> None:
    """Save adapters in PEFT's format: "default" in ``save_directory``, others in ``<dir>/<name>``.

    ``path_initial_model_for_weight_conversion`` (PiSSA / OLoRA adapters): the folder of the
    adapter saved right after initialisation; the adapter is then written converted to a plain
    LoRA adapter for the original base weights (see ``tuners.weight_conversion``).
    Extra keyword arguments (as in PEFT): ``is_main_process`` (False: write nothing),
    ``save_embedding_layers`` ("auto", True or False) and ``state_dict`` (take the weights from
    this state dict instead of the model).
    """
    from .state_dict import get_peft_model_state_dict

    _check_kwargs(kwargs, _SAVE_KWARGS, "save_pretrained")
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save directory {save_directory!r} is a file, expected a folder")
    configs = peft_model.peft_config
    if selected_adapters is None:
        selected_adapters = list(configs)
    else:
        if isinstance(selected_adapters, str) or not all(isinstance(n, str) for n in selected_adapters):
            raise TypeError(f"selected_adapters must be a list of adapter names, got {selected_adapters!r}")
        unknown = [name for name in selected_adapters if name not in configs]
        if unknown:
            raise ValueError(
                f"You passed an invalid `selected_adapters` arguments, current supported adapter names are "
                f"{list(configs)} - but you passed {unknown}"
            )
    if not kwargs.get("is_main_process", True):
        return

    for adapter_name in selected_adapters:
        config = configs[adapter_name]
        tensors = get_peft_model_state_dict(
            peft_model,
            state_dict=kwargs.get("state_dict"),
            adapter_name=adapter_name,
            save_embedding_layers=kwargs.get("save_embedding_layers", "auto"),
        )
        config_dict = config.to_dict()
        if config_dict.get("base_model_name_or_path") is None:
            config_dict["base_model_name_or_path"] = peft_model.get_base_model().__dict__.get("name_or_path") or None
        config_dict["inference_mode"] = True  # a saved adapter is loaded for inference unless asked otherwise
        if config_dict.get("task_type") is None and config_dict.get("auto_mapping") is None:
            # without a task type, PEFT's AutoPeftModel finds the model class from this entry
            base = peft_model.get_base_model()
            config_dict["auto_mapping"] = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
        tensors, config_dict = prepare_for_saving(tensors, config_dict, path_initial_model_for_weight_conversion)
        write_adapter_files(
            adapter_folder(save_directory, adapter_name),
            config_to_peft_json(config_dict, _config_defaults()),
            tensors,
            safe_serialization=safe_serialization,
        )


def _config_defaults() -> dict[str, Any]:
    """Default value of every ``LoraConfig`` field."""
    import dataclasses

    from .config import LoraConfig

    out: dict[str, Any] = {}
    for f in dataclasses.fields(LoraConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _adapter_parameter_names(model: nn.Module, adapter_name: str) -> list[str]:
    """Names of the parameters that belong to ``adapter_name`` (LoRA factors, modules_to_save copies)."""
    from .nn import LoraLayer
    from .tuners import ModulesToSaveWrapper

    names = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, LoraLayer):
            for layer_name in module.adapter_layer_names:
                container = getattr(module, layer_name)
                if adapter_name in container:
                    item = container[adapter_name]
                    if isinstance(item, nn.Parameter):
                        names.append(f"{prefix}{layer_name}.{adapter_name}")
                    else:
                        names.extend(f"{prefix}{layer_name}.{adapter_name}.{n}" for n, _ in item.named_parameters())
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            copy = module.modules_to_save[adapter_name]
            names.extend(f"{prefix}modules_to_save.{adapter_name}.{n}" for n, _ in copy.named_parameters())
    return names


def _embedding_layer_tensors(peft_model: "PeftModel", adapter_name: str) -> dict[str, Tensor]:
    """The base embedding layers PEFT saves beside an adapter that targets them (or after a
    vocabulary resize); a file may hold them and they load into the base model."""
    import warnings

    from .state_dict import get_peft_model_state_dict

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=True)
    except NotImplementedError:  # a transformers model without input embeddings (vision models)
        return {}


def load_weights_into(peft_model: "PeftModel", adapter_name: str, tensors: Mapping[str, Tensor], path: str) -> None:
    """Load a file's tensors into an existing adapter, strictly (see ``check_adapter_weights``)."""
    from .state_dict import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    if any(key not in expected for key in tensors):
        optional = _embedding_layer_tensors(peft_model, adapter_name)
        expected.update({key: value for key, value in optional.items() if key in tensors})
    checked = check_adapter_weights(path, tensors, expected)
    result = set_peft_model_state_dict(peft_model, checked, adapter_name=adapter_name)
    if result.missing_keys:  # every required key was checked above; anything left is a bug, not a warning
        raise ValueError(f"{path}: adapter weights not loaded: {result.missing_keys[:5]}")


def _set_adapter_trainable(peft_model: "PeftModel", adapter_name: str, trainable: bool) -> None:
    params = dict(peft_model.named_parameters())
    for name in _adapter_parameter_names(peft_model, adapter_name):
        if name in params:
            params[name].requires_grad_(trainable)


def _read_folder(
    model_id: str | os.PathLike[str], kwargs: Mapping[str, Any]
) -> tuple[str, dict[str, Any], dict[str, Tensor], str]:
    path = os.fspath(model_id)
    if kwargs.get("subfolder"):
        path = os.path.join(path, kwargs["subfolder"])
    config_json = read_adapter_config(path)
    tensors, weights_path = read_adapter_weights(path)
    return path, config_json, tensors, weights_path


def _move_tensors(tensors: dict[str, Tensor], device: Any) -> dict[str, Tensor]:
    return tensors if device is None else {k: v.to(device) for k, v in tensors.items()}


def load_adapter(
    peft_model: "PeftModel",
    model_id: str | os.PathLike[str],
    adapter_name: str,
    is_trainable: bool = False,
    **kwargs: Any,
) -> None:
    """Add ``adapter_name`` from the folder ``model_id`` (its config) and load its weights strictly.

    The adapter is not activated (``set_adapter`` does that) and is frozen unless
    ``is_trainable``. Files are read and checked before the model changes; if the weights do not
    fit, the half-added adapter is removed again.
    """
    _check_kwargs(kwargs, _LOAD_KWARGS, "load_adapter")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name in peft_model.peft_config:
        raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
    path, config_json, tensors, weights_path = _read_folder(model_id, kwargs)
    config = config_from_json(config_json, os.path.join(path, CONFIG_NAME))
    check_loadable(config, path)
    config.inference_mode = not is_trainable
    peft_model.add_adapter(
        adapter_name, config, autocast_adapter_dtype=kwargs.get("autocast_adapter_dtype", True)
    )
    try:
        load_weights_into(peft_model, adapter_name, _move_tensors(tensors, kwargs.get("torch_device")), weights_path)
    except BaseException:
        peft_model.delete_adapter(adapter_name)
        raise
    _set_adapter_trainable(peft_model, adapter_name, is_trainable)
    if not is_trainable:
        peft_model.eval()


def from_pretrained(
    cls: type["PeftModel"],
    model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str = "default",
    is_trainable: bool = False,
    config: "LoraConfig | None" = None,
    **kwargs: Any,
) -> "PeftModel":
    """Wrap ``model`` with the adapter saved in the folder ``model_id`` (PEFT's or torchlora's).

    ``cls`` is ``PeftModel`` (then the task subclass comes from the config's ``task_type``) or a
    task subclass. Loaded adapters are frozen and the model is in eval mode unless
    ``is_trainable``. If the weights do not fit, ``model`` is restored before the error is raised.
    """
    from .config import LoraConfig
    from .mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    from .peft_model import PeftModel

    _check_kwargs(kwargs, _LOAD_KWARGS, "from_pretrained")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path, config_json, tensors, weights_path = _read_folder(model_id, kwargs)
    if config is None:
        config = config_from_json(config_json, os.path.join(path, CONFIG_NAME))
    elif not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a torchlora LoraConfig, got {type(config).__name__}")
    check_loadable(config, path)
    config.inference_mode = not is_trainable
    if cls is PeftModel:
        cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
    peft_model = cls(
        model, config, adapter_name=adapter_name, autocast_adapter_dtype=kwargs.get("autocast_adapter_dtype", True)
    )
    try:
        load_weights_into(peft_model, adapter_name, _move_tensors(tensors, kwargs.get("torch_device")), weights_path)
    except BaseException:
        peft_model.unload()  # give the caller its model back without LoRA layers
        raise
    _set_adapter_trainable(peft_model, adapter_name, is_trainable)
    if not is_trainable:
        peft_model.eval()
    return peft_model


__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "PEFT_LORA_CONFIG_KEYS",
    "PEFT_BASELINE_KEYS",
    "adapter_folder",
    "atomic_write",
    "config_to_peft_json",
    "write_adapter_files",
    "read_adapter_config",
    "read_adapter_weights",
    "adapter_weights_path",
    "config_from_json",
    "check_adapter_weights",
    "save_pretrained",
    "load_adapter",
    "from_pretrained",
]
