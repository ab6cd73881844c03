"""Adapters on the Hugging Face Hub, reached through ``huggingface_hub`` as PEFT reaches them: a
repository id (with ``subfolder``, ``revision``, ``token``, ``cache_dir``, ...) becomes a local
folder of its cached snapshot, downloaded when needed, read from the cache alone when
``HF_HUB_OFFLINE=1`` or ``local_files_only=True``. ``push_to_hub`` saves and uploads a folder.

``huggingface_hub`` is imported only when a Hub id is used (a local folder needs nothing).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional, Union

from .peft_format import CONFIG_NAME

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

# Download options of huggingface_hub.hf_hub_download that loading functions accept, as PEFT does.
HUB_KWARGS = frozenset({"revision", "token", "cache_dir", "local_files_only", "force_download", "repo_type",
                        "user_agent", "endpoint", "etag_timeout", "headers", "proxies"})


def split_hub_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the Hub download options in ``kwargs``, everything else)."""
    hub = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
    return hub, {k: v for k, v in kwargs.items() if k not in HUB_KWARGS}


def _huggingface_hub():
    try:
        import huggingface_hub
    except ImportError as exc:  # pragma: no cover - installed with transformers
        raise ImportError("loading adapters by Hub id needs the huggingface_hub package "
                          "(pip install huggingface_hub)") from exc
    return huggingface_hub


def _download_kwargs(hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    import inspect

    unexpected = sorted(set(hub_kwargs) - HUB_KWARGS)
    if unexpected:
        raise TypeError(f"unexpected Hub options {unexpected} (supported: {sorted(HUB_KWARGS)})")
    accepted = inspect.signature(_huggingface_hub().hf_hub_download).parameters
    unsupported = sorted(k for k, v in hub_kwargs.items() if k not in accepted and v is not None)
    if unsupported:
        raise TypeError(f"the installed huggingface_hub does not take {unsupported}")
    return {k: v for k, v in hub_kwargs.items() if k in accepted}


def local_folder(model_id: Union[str, os.PathLike], subfolder: Optional[str] = None) -> Optional[str]:
    """``model_id`` (joined with ``subfolder``) if it is a folder on this machine, else None."""
    path = os.fspath(model_id)
    if subfolder:
        path = os.path.join(path, subfolder)
    return path if os.path.isdir(path) else None


def is_hub_id(model_id: Union[str, os.PathLike]) -> bool:
    """Whether ``model_id`` can name a Hub repository ("name" or "org/name"), not only a path."""
    text = os.fspath(model_id)
    if not text or os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text:
        return False
    parts = text.split("/")
    return len(parts) <= 2 and all(parts)


def hub_file(model_id: Union[str, os.PathLike], filename: str, subfolder: Optional[str] = None,
             **hub_kwargs: Any) -> Optional[str]:
    """The local path of ``filename`` in the Hub repository ``model_id`` (from the cache, or
    downloaded), or None when the repository has no such file (or, offline, the cache lacks it)."""
    hf = _huggingface_hub()
    from huggingface_hub.errors import EntryNotFoundError

    kwargs = _download_kwargs(hub_kwargs)
    try:
        return hf.hf_hub_download(os.fspath(model_id), filename, subfolder=subfolder or None, **kwargs)
    except EntryNotFoundError:  # also LocalEntryNotFoundError: not in the cache while offline
        return None


def resolve_adapter_config(model_id: Union[str, os.PathLike], subfolder: Optional[str] = None,
                           **hub_kwargs: Any) -> str:
    """The path of ``adapter_config.json`` of a local folder or of a Hub repository."""
    folder = local_folder(model_id, subfolder)
    if folder is not None and os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return os.path.join(folder, CONFIG_NAME)
    if folder is not None or not is_hub_id(model_id):
        path = folder or os.path.join(os.fspath(model_id), subfolder or "")
        raise ValueError(f"Can't find '{CONFIG_NAME}' at '{path}'")
    try:
        path = hub_file(model_id, CONFIG_NAME, subfolder, **hub_kwargs)
    except (TypeError, ImportError):
        raise
    except Exception as exc:  # invalid repository id, offline without a cached copy, network or auth errors
        raise ValueError(f"Can't find '{CONFIG_NAME}' at '{os.fspath(model_id)}'"
                         f"{f' (subfolder {subfolder!r})' if subfolder else ''}: {exc}") from exc
    if path is None:
        raise ValueError(f"Can't find '{CONFIG_NAME}' at '{os.fspath(model_id)}'"
                         f"{f' (subfolder {subfolder!r})' if subfolder else ''}")
    return path


def resolve_adapter_folder(model_id: Union[str, os.PathLike], subfolder: Optional[str] = None,
                           **hub_kwargs: Any) -> str:
    """A local folder with the adapter's ``adapter_config.json`` and weights file: ``model_id``
    itself when it is a folder, else the snapshot folder of the Hub repository ``model_id`` at
    ``revision`` with both files fetched (safetensors first, then PEFT's older ``.bin``)."""
    folder = local_folder(model_id, subfolder)
    if folder is not None:
        return folder
    if not is_hub_id(model_id):  # a path that does not exist: the folder reader names it
        return os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    config_path = resolve_adapter_config(model_id, subfolder, **hub_kwargs)
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        weights = hub_file(model_id, name, subfolder, **hub_kwargs)
        if weights is not None:
            if os.path.dirname(weights) != os.path.dirname(config_path):
                raise ValueError(f"{model_id}: the config and the weights resolved to different snapshots "
                                 f"({config_path}, {weights}); the repository changed while loading, try again")
            return os.path.dirname(config_path)
    raise ValueError(f"Can't find '{SAFETENSORS_WEIGHTS_NAME}' or '{WEIGHTS_NAME}' at '{os.fspath(model_id)}'"
                     f"{f' (subfolder {subfolder!r})' if subfolder else ''}")


def has_tokenizer(model_id: Union[str, os.PathLike], **hub_kwargs: Any) -> bool:
    """Whether the adapter's folder or repository holds a tokenizer (PEFT then resizes the
    base model's embeddings to it)."""
    folder = local_folder(model_id)
    if folder is not None:
        return os.path.isfile(os.path.join(folder, TOKENIZER_CONFIG_NAME))
    try:
        return hub_file(model_id, TOKENIZER_CONFIG_NAME, **hub_kwargs) is not None
    except Exception:  # noqa: BLE001 - PEFT's check answers False on any Hub failure too
        return False


def push_to_hub(save: Any, repo_id: str, commit_message: Optional[str] = None, private: Optional[bool] = None,
                token: Union[bool, str, None] = None, revision: Optional[str] = None, create_pr: bool = False,
                commit_description: Optional[str] = None, **save_kwargs: Any) -> Any:
    """Create ``repo_id`` if needed, write the folder with ``save(folder, **save_kwargs)`` into a
    temporary directory and upload it with ``huggingface_hub.upload_folder``; returns its
    ``CommitInfo``."""
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a non-empty string, got {repo_id!r}")
    hf = _huggingface_hub()
    hf.create_repo(repo_id, token=token, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        save(folder, **save_kwargs)
        return hf.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload model",
                                commit_description=commit_description, token=token, revision=revision,
                                create_pr=create_pr)
