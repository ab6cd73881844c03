"""Builds torchlora's native core by driving CMake (CMakeLists.txt is the one build
description). Metadata lives in pyproject.toml.

Environment:
  TORCHLORA_CUDA=0/1/AUTO   force the CUDA kernels off/on (default AUTO: on when nvcc is found
                            and torch is a CUDA build; never decided by whether a GPU is
                            present). Passed to CMake as given; cmake/TorchLoraCuda.cmake reads it.
  TORCH_CUDA_ARCH_LIST      CUDA architectures, torch's syntax (default "8.0;9.0")
  TORCHLORA_BUILD_DIR       CMake build folder to (re)use (default build/cmake-<tag>)
  TORCHLORA_BUILD_TYPE      CMake build type (default Release)
  MAX_JOBS                  parallel compile jobs (default: all cores)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
MIN_CMAKE = (3, 26)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _cmake_executable() -> str:
    candidates = []
    try:
        import cmake  # the PyPI cmake: recent enough to set C++20 for nvcc

        candidates.append(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))
    except ImportError:
        pass
    if shutil.which("cmake"):
        candidates.append(shutil.which("cmake"))
    for exe in candidates:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"version (\d+)\.(\d+)", out)
        if m and (int(m.group(1)), int(m.group(2))) >= MIN_CMAKE:
            return exe
    raise RuntimeError(
        f"torchlora needs CMake >= {MIN_CMAKE[0]}.{MIN_CMAKE[1]} (found: {candidates or 'none'}); "
        "`pip install cmake` provides one"
    )


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        package_dirs = [Path(self.get_ext_fullpath(ext.name)).parent.resolve()]
        if getattr(self, "editable_mode", False) or self.inplace:
            # editable installs import from the source tree: lib/, include/, share/ go there too
            package_dirs.append(ROOT / "python" / "torchlora")
        torch_root = Path(torch.__file__).parent
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}"
        build_dir = Path(os.environ.get("TORCHLORA_BUILD_DIR", ROOT / "build" / f"cmake-{tag}")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("TORCHLORA_BUILD_TYPE", "Release")

        cmake = _cmake_executable()
        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DTORCH_ROOT={torch_root}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            # read by cmake/TorchLoraCuda.cmake (the one place that interprets it); unset is AUTO
            f"-DTORCHLORA_CUDA={os.environ.get('TORCHLORA_CUDA', 'AUTO')}",
            "-DTORCHLORA_PYTHON_PACKAGE_LAYOUT=ON",
            "-DTORCHLORA_BUILD_PYTHON=ON",
            f"-DTORCHLORA_BUILD_TESTS={os.environ.get('TORCHLORA_BUILD_TESTS', 'OFF')}",
        ]
        if os.environ.get("TORCH_CUDA_ARCH_LIST"):
            args.append(f"-DTORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        if cuda_home:
            args.append(f"-DCUDAToolkit_ROOT={cuda_home}")
        if not (build_dir / "CMakeCache.txt").exists():
            try:
                import ninja  # noqa: F401

                args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={shutil.which('ninja') or ''}"]
            except ImportError:
                pass
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)

        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        for package_dir in dict.fromkeys(package_dirs):
            subprocess.run([cmake, "--install", str(build_dir), "--prefix", str(package_dir)], check=True)


setup(
    ext_modules=[CMakeExtension("torchlora._C")],
    cmdclass={"build_ext": CMakeBuild},
)
