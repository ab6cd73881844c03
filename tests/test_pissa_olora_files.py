"""PiSSA / OLoRA adapters, whose initialisation rewrites the base weights, in files: saved as they
are (loading recomputes the residual base weight) and converted for the original weights
(``save_pretrained(path_initial_model_for_weight_conversion=...)``), written by torchlora or PEFT
and read by PEFT, torchlora, the C++ loader (torchlora._C.cpp), the C++ TorchScript serving path
and the example C++ server: every reader computes what the trained model computes."""

from __future__ import annotations

import copy
import json
import math
import shutil
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tiny_models as tm
import torchlora
from peft_parity import logits
from torchscript_files import save_torchscript
from test_cpp_api import TokenModel, assert_output, run_server, server_binary  # noqa: F401  (a fixture)

IDS = tm.input_ids()
TARGETS = ["q_proj", "v_proj", "down_proj"]
INITS = ["pissa", "olora"]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _out(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return logits(model(*inputs)) if inputs else logits(model(input_ids=IDS))


def _train_one_step(model: nn.Module, loss_of) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=2.0)
    model.train()
    loss_of(model).backward()
    optimizer.step()
    model.eval()


def _lm_loss(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, labels=IDS).loss


def _trained(lib, tmp_path: Path, **config):
    """A llama adapter of `lib` (torchlora or peft) saved to tmp_path/initial, then trained a
    step; returns the model and its output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(tm.llama(), lib.LoraConfig(r=4, lora_alpha=8, **config))
    model.save_pretrained(str(tmp_path / "initial"))
    _train_one_step(model, _lm_loss)
    expected = _out(model)
    assert not torch.allclose(expected, _out(tm.llama()), atol=1e-4)  # the adapter does something
    return model, expected


def _load(lib, folder: Path, base: nn.Module | None = None) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.PeftModel.from_pretrained(base if base is not None else tm.llama(), str(folder)).eval()


def _config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


# ----------------------------------------------------------------------------- Python and PEFT
@pytest.mark.parametrize("init", INITS)
def test_torchlora_files_load_in_peft_and_torchlora(init: str, tmp_path: Path) -> None:
    ours, expected = _trained(torchlora, tmp_path, target_modules=TARGETS, init_lora_weights=init)
    ours.save_pretrained(str(tmp_path / "raw"))
    ours.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    config = _config(tmp_path / "converted")
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    assert _config(tmp_path / "raw")["init_lora_weights"] == init
    assert _config(tmp_path / "initial")["init_lora_weights"] == init  # only read
    for folder in ("raw", "converted"):
        _close(_out(_load(peft, tmp_path / folder)), expected)
        _close(_out(_load(torchlora, tmp_path / folder)), expected)

    # The converted files are PEFT's conversion of the same adapter.
    ref = _load(peft, tmp_path / "raw")
    shutil.copytree(tmp_path / "initial", tmp_path / "peft_initial")  # PEFT rewrites its config
    ref.save_pretrained(str(tmp_path / "peft_converted"),
                        path_initial_model_for_weight_conversion=str(tmp_path / "peft_initial"))
    ours_tensors = load_file(str(tmp_path / "converted" / "adapter_model.safetensors"))
    peft_tensors = load_file(str(tmp_path / "peft_converted" / "adapter_model.safetensors"))
    assert set(ours_tensors) == set(peft_tensors)
    for key, value in peft_tensors.items():
        _close(ours_tensors[key], value, 1e-6)
    peft_config = _config(tmp_path / "peft_converted")
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert config[key] == peft_config[key], key
    assert sorted(config["target_modules"]) == sorted(peft_config["target_modules"])


@pytest.mark.parametrize("init", INITS)
def test_peft_files_load_in_torchlora(init: str, tmp_path: Path) -> None:
    ref, expected = _trained(peft, tmp_path, target_modules=TARGETS, init_lora_weights=init)
    ref.save_pretrained(str(tmp_path / "raw"))
    ref.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    for folder in ("raw", "converted"):
        _close(_out(_load(torchlora, tmp_path / folder)), expected)
    # ... also as a second adapter of a model (load_adapter injects and recomputes the same way).
    model = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["k_proj"]))
    model.load_adapter(str(tmp_path / "raw"), "trained")
    model.set_adapter("trained")
    _close(_out(model), expected)


@pytest.mark.parametrize("extra", [
    dict(rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}),
    dict(use_rslora=True),
    dict(target_modules=["q_proj", "embed_tokens"]),
], ids=["patterns", "rslora", "embedding"])
def test_conversion_keeps_every_scaling(extra: dict, tmp_path: Path) -> None:
    config = dict(target_modules=TARGETS, init_lora_weights="pissa") | extra
    ours, expected = _trained(torchlora, tmp_path, **config)
    ours.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    saved = _config(tmp_path / "converted")
    if "rank_pattern" in extra:
        assert saved["rank_pattern"] == {"v_proj": 4} and saved["alpha_pattern"] == {"q_proj": 6}
    if extra.get("use_rslora"):
        assert saved["lora_alpha"] == pytest.approx(8 * math.sqrt(2))
    _close(_out(_load(peft, tmp_path / "converted")), expected)
    _close(_out(_load(torchlora, tmp_path / "converted")), expected)


def test_conversion_errors(tmp_path: Path) -> None:
    ours, _ = _trained(torchlora, tmp_path, target_modules=["v_proj"], init_lora_weights="pissa", use_rslora=True,
                       rank_pattern={"v_proj": 2})
    with pytest.raises(ValueError, match="use_rslora=True"):  # as PEFT
        ours.save_pretrained(str(tmp_path / "c"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    other, _ = _trained(torchlora, tmp_path / "other", target_modules=["down_proj"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="the initial adapter lacks"):
        other.save_pretrained(str(tmp_path / "c"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))


def test_randomised_pissa_is_rejected_unless_converted(tmp_path: Path) -> None:
    ref, expected = _trained(peft, tmp_path, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa_niter_2")
    ref.save_pretrained(str(tmp_path / "raw"))
    ref.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    with pytest.raises(ValueError, match="randomised SVD.*path_initial_model_for_weight_conversion"):
        torchlora.PeftModel.from_pretrained(tm.llama(), str(tmp_path / "raw"))
    model = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=str(tmp_path / "raw")):
        model.load_adapter(str(tmp_path / "raw"), "niter")
    assert "niter" not in model.peft_config
    # The C++ loader rejects it with the same message.
    with pytest.raises(ValueError, match="randomised SVD.*path_initial_model_for_weight_conversion"):
        torchlora._C.cpp.load_peft_adapter(str(tmp_path / "raw"))
    _close(_out(_load(torchlora, tmp_path / "converted")), expected)
    # torchlora converts it too, and warns when it is saved as it is.
    ours, ours_expected = _trained(torchlora, tmp_path / "ours", target_modules=["v_proj"],
                                   init_lora_weights="pissa_niter_2")
    with pytest.warns(UserWarning, match="will not load as it is saved"):
        ours.save_pretrained(str(tmp_path / "ours_raw"))
    ours.save_pretrained(str(tmp_path / "ours_converted"),
                         path_initial_model_for_weight_conversion=str(tmp_path / "ours" / "initial"))
    _close(_out(_load(peft, tmp_path / "ours_converted")), ours_expected)


# ----------------------------------------------------------------------------- the C++ side
@pytest.mark.parametrize("init", INITS)
def test_cpp_conversion_gives_the_python_weights(init: str, tmp_path: Path) -> None:
    ours, expected = _trained(torchlora, tmp_path, target_modules=TARGETS, init_lora_weights=init)
    ours.save_pretrained(str(tmp_path / "raw"))
    originals = {name[: -len(".weight")]: p.detach() for name, p in tm.llama().named_parameters()}
    config_json, modules = torchlora._C.cpp.adapter_for_original_weights(
        str(tmp_path / "raw"), originals, save_to=str(tmp_path / "cpp_converted"))
    config = json.loads(config_json)
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    assert len(modules) == 2 * 3
    for path, info in modules.items():
        layer = ours.base_model.model.get_submodule(path)
        python_weight = layer.base_layer.weight + layer.get_delta_weight("default")
        _close(originals[path] + info["delta_weight"], python_weight)
    # What the C++ writer wrote is a plain adapter PEFT loads on the original model.
    _close(_out(_load(peft, tmp_path / "cpp_converted")), expected)
    _close(_out(_load(torchlora, tmp_path / "cpp_converted")), expected)


def _token_case(init: str, tmp_path: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A TokenModel, a PiSSA / OLoRA adapter on it trained a step and saved to tmp_path/<init>,
    input ids and the trained model's output; the base model is scripted to tmp_path/model.pt."""
    torch.manual_seed(20)
    base = TokenModel().eval()
    ours = torchlora.get_peft_model(copy.deepcopy(base), torchlora.LoraConfig(
        r=4, lora_alpha=8, target_modules=["emb", "fc1", "fc2"], init_lora_weights=init))
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(3))
    _train_one_step(ours, lambda m: m(ids).square().mean())
    ours.save_pretrained(str(tmp_path / init))
    save_torchscript(base, tmp_path / "model.pt")
    expected = _out(ours, ids)
    assert not torch.allclose(expected, _out(base, ids), atol=1e-4)
    return base, ids, expected


@pytest.mark.parametrize("init", INITS)
def test_cpp_script_model_serves_what_python_computes(init: str, tmp_path: Path) -> None:
    base, ids, expected = _token_case(init, tmp_path)
    model = torchlora._C.cpp.LoraScriptModel(str(tmp_path / "model.pt"))
    model.load_adapter("p", str(tmp_path / init))
    _close(model.forward([ids], "p"), expected)
    _close(model.forward([ids]), _out(base, ids))
    _close(model.forward([ids], "p"), expected)  # swapped back exactly


def test_cpp_server_serves_pissa_and_olora_adapters(server_binary: Path, tmp_path: Path) -> None:  # noqa: F811
    expected = {}
    for init in INITS:
        _, ids, expected[init] = _token_case(init, tmp_path)  # the same base model and ids for both
    niter = tmp_path / "niter"
    shutil.copytree(tmp_path / "pissa", niter)
    config = _config(niter) | {"init_lora_weights": "pissa_niter_3"}
    (niter / "adapter_config.json").write_text(json.dumps(config))

    requests = [{"id": name, "adapter": name, "input": ids.tolist(), "dtype": "int64"} for name in INITS + INITS[::-1]]
    requests.append({"id": "niter", "load_adapter": "niter", "path": str(niter)})
    adapters = {init: tmp_path / init for init in INITS}
    responses = run_server(server_binary, tmp_path / "model.pt", adapters, requests)
    for response in responses[:-1]:
        assert_output(response, expected[response["id"]])
    assert "pissa_niter_3" in responses[-1]["error"] and "path_initial_model_for_weight_conversion" in \
        responses[-1]["error"]
