"""The package reports how its native core was built and where its CMake package lives."""

import os

import torch

import torchlora


def test_build_info_fields():
    info = torchlora.build_info()
    assert set(info) == {"version", "torch_version", "cuda", "cuda_version", "cuda_architectures"}
    assert info["version"] == torchlora.__version__
    assert info["torch_version"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    assert info["cuda"] == bool(info["cuda_architectures"]) == bool(info["cuda_version"])


def test_operators_are_registered():
    for name in ("lora_linear", "lora_embedding", "lora_conv2d", "dropout_apply"):
        assert hasattr(torch.ops.torchlora, name)


def test_cmake_package_is_installed():
    config = os.path.join(torchlora.cmake_prefix_path, "TorchLora", "TorchLoraConfig.cmake")
    assert os.path.isfile(config)
    assert os.path.isfile(os.path.join(os.path.dirname(torchlora.__file__), "include", "torchlora", "ops.h"))
