"""Lets the suite run from a source checkout: without an installed torchlora, the checkout's
python/ folder (where scripts/dev-build.sh installs the native parts) is put on sys.path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def ensure_torchlora_importable() -> None:
    if importlib.util.find_spec("torchlora") is not None:
        return
    checkout_python = Path(__file__).resolve().parent.parent / "python"
    if (checkout_python / "torchlora").is_dir():
        sys.path.insert(0, str(checkout_python))
