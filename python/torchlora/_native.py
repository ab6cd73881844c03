"""Loads the native core: importing ``torchlora._C`` loads libtorchlora, which registers the
operators under ``torch.ops.torchlora``."""

from __future__ import annotations

import os
from typing import Any

import torch  # noqa: F401  (torch's libraries must be loaded before libtorchlora)

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only on broken installs
    raise ImportError(
        "torchlora's native module could not be loaded. Build it with "
        "`pip install --no-build-isolation .` (or `-e .`) with the same torch you import; "
        f"underlying error: {exc}"
    ) from exc

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

#: Folder to put on ``CMAKE_PREFIX_PATH`` so that ``find_package(TorchLora)`` finds this
#: install (like ``torch.utils.cmake_prefix_path``).
cmake_prefix_path: str = os.path.join(_PACKAGE_DIR, "share", "cmake")


def build_info() -> dict[str, Any]:
    """What the native core was built with: ``version``, ``torch_version``, ``cuda`` (whether
    the CUDA kernels were compiled), ``cuda_version`` and ``cuda_architectures``."""
    return dict(_C.build_info())


def check_torch_version() -> None:
    """Raise if the running torch differs (major.minor) from the one the core was built for."""
    built = build_info()["torch_version"]
    running = torch.__version__.split("+")[0]
    if built.split(".")[:2] != running.split(".")[:2]:
        raise ImportError(
            f"torchlora was built against torch {built} but torch {running} is imported; "
            "rebuild torchlora with this torch (pip install --no-build-isolation .)"
        )


check_torch_version()
