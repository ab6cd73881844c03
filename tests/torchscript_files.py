"""Writing TorchScript files for the tests of the TorchScript serving path (LoraScriptModel).

torch >= 2.10 deprecates torch.jit.script/trace/save/load with a FutureWarning; these tests
use TorchScript on purpose (the path stays for existing users), so that one warning is expected
here and silenced here, and nowhere else."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"


def save_torchscript(module: nn.Module, path: Path, example: Optional[torch.Tensor] = None) -> Path:
    """Scripts ``module`` (or traces it with ``example``) and saves it to ``path``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATED, category=FutureWarning)
        scripted = (torch.jit.trace(module, example, check_trace=False) if example is not None
                    else torch.jit.script(module))
        scripted.save(str(path))
    return path
