"""Python and C++ give the same verdict on adapter folders: both accept with identical tensors,
or both reject and name the same field or key.

The Python loader is ``PeftModel.from_pretrained`` on a tiny model; the C++ loader is
``torchlora::io::load_peft_adapter`` through ``_C.cpp.load_peft_adapter``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import peft
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchlora
from torchlora import LoraConfig, PeftModel
from torchlora._native import _C

PREFIX = "base_model.model."
ERRORS = (ValueError, TypeError, NotImplementedError)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 6)
        self.v = nn.Linear(8, 6)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for block in self.layers:
            h = torch.cat([block.q(h), block.v(h)], -1)[..., :8]
        return self.head(h[..., :6])


QV = ["layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v"]


@dataclasses.dataclass
class Case:
    name: str
    config: Any                       # dict written as JSON, or raw text
    modules: dict[str, int] = dataclasses.field(default_factory=lambda: {m: 4 for m in QV})
    expect: Optional[str] = None      # None: both accept; else text both errors contain
    dtype: torch.dtype = torch.float32
    bias: bool = False
    embedding: dict[str, int] = dataclasses.field(default_factory=dict)
    edit: Any = None                  # a function changing the tensor dict before it is saved


def _base(**extra: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], **extra}


def _poison(key: str, value: float):
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
    return edit


def _drop(key: str):
    return lambda tensors: tensors.pop(key)


def _retype(key: str, dtype: torch.dtype):
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].to(dtype)
    return edit


def _biases() -> dict[str, torch.Tensor]:
    """bias="all": every bias of the model is saved with the adapter (PEFT's keys)."""
    out = {f"{PREFIX}{m}.base_layer.bias": torch.randn(6) for m in QV}
    out[f"{PREFIX}head.bias"] = torch.randn(3)
    return out


def _token_rows(indices: list[int]):
    """Adds trainable token rows of `emb` (one per index) to the file."""
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{PREFIX}emb.{_C.peft.TRAINABLE_TOKENS_DELTA}"] = torch.randn(len(indices), 8)
    return edit


A0 = f"{PREFIX}layers.0.q.lora_A.weight"
B0 = f"{PREFIX}layers.0.q.lora_B.weight"

CASES = [
    # ---- good folders
    Case("plain", _base()),
    Case("rslora", _base(use_rslora=True)),
    Case("rank_pattern", _base(rank_pattern={"layers.1.q": 2}), modules={**{m: 4 for m in QV}, "layers.1.q": 2}),
    Case("alpha_pattern", _base(alpha_pattern={"v": 3})),
    Case("regex_target", _base(target_modules=r".*\.q"), modules={"layers.0.q": 4, "layers.1.q": 4}),
    Case("layers_to_transform", _base(layers_to_transform=[1], layers_pattern="layers"),
         modules={"layers.1.q": 4, "layers.1.v": 4}),
    Case("exclude_modules", _base(exclude_modules=["layers.0.v"]),
         modules={"layers.0.q": 4, "layers.1.q": 4, "layers.1.v": 4}),
    Case("lora_bias", _base(lora_bias=True), bias=True),
    Case("float16_tensors", _base(), dtype=torch.float16),
    Case("bfloat16_tensors", _base(), dtype=torch.bfloat16),
    Case("gaussian_init", _base(init_lora_weights="gaussian")),
    Case("dropout", _base(lora_dropout=0.1)),
    Case("embedding", _base(target_modules=["emb"]), modules={}, embedding={"emb": 4}),
    Case("runtime_config_dropped_on_load", _base(runtime_config={"ephemeral_gpu_offload": True})),
    Case("unsupported_at_default", _base(use_dora=False, megatron_core="megatron.core", loftq_config={},
                                         qalora_group_size=16, layer_replication=None)),
    Case("bias_all", _base(bias="all"), edit=lambda t: t.update(_biases())),
    Case("inference_mode_false", _base(inference_mode=False)),
    Case("revision_and_base", _base(revision="main", base_model_name_or_path="tiny")),
    # PiSSA / OLoRA saved unconverted: both recompute from the original weights ...
    Case("pissa_unconverted", _base(init_lora_weights="pissa")),
    Case("olora_unconverted", _base(init_lora_weights="olora")),
    # ... except a randomised SVD, which neither can reproduce
    Case("pissa_niter_unconverted", _base(init_lora_weights="pissa_niter_4"), expect="pissa_niter_4"),
    # ---- bad values
    Case("r_zero", _base(r=0), expect="r"),
    Case("r_negative", _base(r=-1), expect="r"),
    Case("r_float", _base(r=2.5), expect="r must be an int"),
    Case("r_string", _base(r="4"), expect="r must be an int"),
    Case("alpha_zero", _base(lora_alpha=0), expect="lora_alpha"),
    Case("alpha_negative", _base(lora_alpha=-2.0), expect="lora_alpha"),
    Case("alpha_string", _base(lora_alpha="8"), expect="lora_alpha"),
    Case("alpha_nan", json.dumps(_base()).replace('"lora_alpha": 8', '"lora_alpha": NaN'),
         expect="adapter_config.json"),
    Case("dropout_one", _base(lora_dropout=1.0), expect="lora_dropout"),
    Case("dropout_negative", _base(lora_dropout=-0.5), expect="lora_dropout"),
    Case("bias_unknown", _base(bias="some"), expect="bias"),
    Case("init_unknown", _base(init_lora_weights="kaiming"), expect="init_lora_weights"),
    Case("target_modules_int", _base(target_modules=5), expect="target_modules"),
    Case("target_modules_bad_regex", _base(target_modules="(unclosed"), expect="target_modules"),
    Case("modules_to_save_string", _base(modules_to_save="head"), expect="modules_to_save"),
    Case("rank_pattern_zero", _base(rank_pattern={"q": 0}), expect="rank_pattern"),
    Case("alpha_pattern_string", _base(alpha_pattern={"q": "x"}), expect="alpha_pattern"),
    Case("layers_to_transform_string", _base(layers_to_transform="0"), expect="layers_to_transform"),
    Case("fan_in_fan_out_int", _base(fan_in_fan_out=1), expect="fan_in_fan_out"),
    Case("task_type_unknown", _base(task_type="TRANSLATION"), expect="Invalid task type"),
    Case("peft_type_other", _base(peft_type="IA3"), expect="peft_type"),
    Case("not_an_object", "[1, 2]", expect="JSON object"),
    Case("not_json", "{r: 4", expect="not valid JSON"),
    # ---- combinations PEFT rejects
    Case("pattern_without_layers", _base(layers_pattern="layers"), expect="layers_to_transform"),
    Case("regex_with_layers", _base(target_modules=r".*\.q", layers_to_transform=[0]), expect="layers_to_transform"),
    Case("lora_bias_with_gaussian", _base(lora_bias=True, init_lora_weights="gaussian"), expect="lora_bias"),
    # ---- unknown keys and options torchlora lacks
    Case("unknown_key", _base(my_option=1), expect="my_option"),
    Case("unknown_keys", _base(zeta=1, alpha_option=2), expect="['alpha_option', 'zeta']"),
    Case("use_dora_without_magnitudes", _base(use_dora=True), expect="lora_magnitude_vector"),
    # ---- trainable tokens and LoRA on parameters
    Case("trainable_token_indices_without_rows", _base(trainable_token_indices=[1, 2]),
         expect="trainable_token_indices"),
    Case("trainable_token_rows", _base(trainable_token_indices={"emb": [1, 2]}), edit=_token_rows([1, 2])),
    Case("trainable_token_rows_miscounted", _base(trainable_token_indices={"emb": [1, 2]}), edit=_token_rows([1]),
         expect="token_adapter.trainable_tokens_delta"),
    Case("target_parameters_with_dropout", _base(target_parameters=["w"], lora_dropout=0.1),
         expect="target_parameters"),
    Case("layer_replication", _base(layer_replication=[[0, 1]]), expect="layer_replication"),
    Case("alora", _base(alora_invocation_tokens=[1]), expect="alora_invocation_tokens"),
    Case("arrow", _base(arrow_config={"top_k": 2}), expect="arrow_config"),
    Case("loftq_init", _base(init_lora_weights="loftq"), expect="init_lora_weights"),
    Case("qalora", _base(use_qalora=True), expect="use_qalora"),
    # ---- tensors
    Case("non_finite_inf", _base(), edit=_poison(A0, float("inf")), expect=A0),
    Case("non_finite_nan", _base(), edit=_poison(B0, float("nan")), expect=B0),
    Case("integer_tensor", _base(), edit=_retype(A0, torch.int32), expect=A0),
    Case("rank_mismatch", _base(), modules={**{m: 4 for m in QV}, "layers.0.q": 2}, expect="layers.0.q"),
    Case("missing_lora_B", _base(), edit=_drop(B0), expect="layers.0.q"),
]


def _tensors(case: Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    model = Tiny()
    for path, r in case.modules.items():
        layer = model.get_submodule(path)
        out[f"{PREFIX}{path}.lora_A.weight"] = torch.randn(r, layer.in_features, generator=g).to(case.dtype)
        out[f"{PREFIX}{path}.lora_B.weight"] = torch.randn(layer.out_features, r, generator=g).to(case.dtype)
        if case.bias:
            out[f"{PREFIX}{path}.lora_B.bias"] = torch.randn(layer.out_features, generator=g).to(case.dtype)
    for path, r in case.embedding.items():
        layer = model.get_submodule(path)
        out[f"{PREFIX}{path}.lora_embedding_A"] = torch.randn(r, layer.num_embeddings, generator=g).to(case.dtype)
        out[f"{PREFIX}{path}.lora_embedding_B"] = torch.randn(layer.embedding_dim, r, generator=g).to(case.dtype)
    if case.edit is not None:
        case.edit(out)
    return out


def _write(case: Case, folder: Path) -> Path:
    folder.mkdir()
    text = case.config if isinstance(case.config, str) else json.dumps(case.config)
    (folder / "adapter_config.json").write_text(text)
    save_file(_tensors(case), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def _python_load(folder: Path):
    torch.manual_seed(0)
    return PeftModel.from_pretrained(Tiny(), str(folder))


def _verdict(load, folder: Path):
    try:
        return "ok", load(folder)
    except ERRORS as exc:
        return type(exc), str(exc)


def test_enough_cases():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_python_and_cpp_agree(case: Case, tmp_path: Path):
    folder = _write(case, tmp_path / case.name)
    py_kind, py_result = _verdict(_python_load, folder)
    cpp_kind, cpp_result = _verdict(lambda f: _C.cpp.load_peft_adapter(str(f)), folder)
    if case.expect is None:
        assert py_kind == "ok", py_result
        assert cpp_kind == "ok", cpp_result
        _assert_same_tensors(py_result, cpp_result[0])
        return
    assert py_kind != "ok" and cpp_kind != "ok", (py_kind, cpp_kind)
    assert py_kind is cpp_kind, (py_result, cpp_result)
    assert case.expect in py_result, py_result
    assert case.expect in cpp_result, cpp_result


def _assert_same_tensors(model, cpp_modules: dict[str, dict]) -> None:
    layers = {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, torchlora.LoraLayer)}
    assert set(layers) == set(cpp_modules)
    for name, cpp in cpp_modules.items():
        layer = layers[name]
        if cpp["kind"] == "embedding":
            a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        else:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(a.detach(), cpp["lora_A"].to(a.dtype), rtol=0, atol=0)
        torch.testing.assert_close(b.detach(), cpp["lora_B"].to(b.dtype), rtol=0, atol=0)
        assert layer.scaling["default"] == cpp["scaling"], name
        if cpp["lora_bias"] is not None:
            torch.testing.assert_close(layer.lora_B["default"].bias.detach(), cpp["lora_bias"].to(a.dtype))


# ---------------------------------------------------------------------- the schema itself
def test_python_dataclass_has_exactly_the_schema_fields():
    schema = [name for name, _, _ in _C.peft.lora_config_fields()]
    assert {f.name for f in dataclasses.fields(LoraConfig)} == set(schema)


def test_schema_knows_every_peft_field_with_peft_defaults():
    schema = {name: default for name, default, _ in _C.peft.lora_config_fields()}
    for f in dataclasses.fields(peft.LoraConfig):
        assert f.name in schema, f.name
        if f.name == "runtime_config":
            continue  # an object in PEFT; the schema's null stands for its all-default form
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert schema[f.name] == default, f.name


def test_cpp_config_writer_output_is_read_by_peft(tmp_path: Path):
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q", "v"], rank_pattern={"q": 2}, use_rslora=True)
    config.save_pretrained(str(tmp_path))
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert theirs.r == 4 and theirs.lora_alpha == 16 and theirs.rank_pattern == {"q": 2} and theirs.use_rslora
    assert set(theirs.target_modules) == {"q", "v"}


@pytest.mark.parametrize("alpha,r,rslora", [(8, 4, False), (16, 8, True), (3.5, 7, False), (1, 1, True)])
def test_scaling_is_the_cores(alpha, r, rslora):
    layer = torchlora.LoraLinear(nn.Linear(4, 4), r=r, lora_alpha=alpha, use_rslora=rslora)
    kwargs = dict(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["q"])
    ref = peft.get_peft_model(Block(), peft.LoraConfig(**kwargs)).base_model.model.q
    ours = torchlora.get_peft_model(Block(), LoraConfig(**kwargs)).base_model.model.q
    assert layer.scaling["default"] == _C.peft.lora_scaling(alpha, r, rslora) == ref.scaling["default"]
    assert ours.scaling["default"] == ref.scaling["default"]


@pytest.mark.parametrize("key,adapter,expected", [
    ("a.lora_A.default.weight", "default", "base_model.model.a.lora_A.weight"),
    ("a.lora_embedding_A.default", "default", "base_model.model.a.lora_embedding_A"),
    ("a.b.lora_B.other.bias", "other", "base_model.model.a.b.lora_B.bias"),
    ("head.weight", "default", "base_model.model.head.weight"),
    ("a.lora_A.other.weight", "default", "base_model.model.a.lora_A.other.weight"),
])
def test_key_names_are_the_cores_and_peft_s(key, adapter, expected):
    from peft.utils.save_and_load import get_peft_model_state_dict  # noqa: F401  (PEFT's own rule below)

    assert _C.peft.to_peft_key(key, adapter) == expected
    if ".lora_" in key and f".{adapter}" in key:
        assert _C.peft.from_peft_key(expected, adapter) == key


def test_saved_keys_equal_peft_s():
    kwargs = dict(r=2, target_modules=["q", "v", "emb"])
    ours = torchlora.get_peft_model(Tiny(), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(Tiny(), peft.LoraConfig(**kwargs))
    assert set(torchlora.get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(theirs))


@pytest.mark.parametrize("name,patterns,index", [
    ("model.layers.3.self_attn.q_proj", ["layers"], 3),
    ("model.layers.3.experts.7.w1", [], 3),
    ("encoder.block.12.attn", ["block"], 12),
    ("q_proj", [], None),
])
def test_layer_index_matches_peft(name, patterns, index):
    assert _C.peft.layer_index(name, patterns) == index


# ---------------------------------------------------------------------- target matching vs PEFT
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
         "model.layers.12.mlp.experts.3.up", "model.layers.0.self_attn.k_proj", "lm_head", "q_proj",
         "encoder.block.2.attn.q", "model.layers.0.self_attn.q_proj.inner", "score"]
MATCH_CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["q_proj"], exclude_modules=["model.layers.1.self_attn.q_proj"]),
    dict(target_modules=r".*\.(q|v)_proj"),
    dict(target_modules=r".*\.(q|v)_proj", exclude_modules=r".*layers\.1.*"),
    dict(target_modules=["q_proj", "v_proj", "up"], layers_to_transform=[1, 12], layers_pattern="layers"),
    dict(target_modules=["q_proj", "up"], layers_to_transform=0),
    dict(target_modules=["q_proj", "q"], layers_to_transform=[2], layers_pattern=["block", "layers"]),
    dict(target_modules=["q_proj", "score"], modules_to_save=["score"]),
    dict(target_modules=["self_attn.q_proj"]),
]


@pytest.mark.parametrize("kwargs", MATCH_CONFIGS, ids=[str(k) for k in MATCH_CONFIGS])
def test_target_matching_equals_peft(kwargs):
    from peft.tuners.tuners_utils import check_target_module_exists

    from torchlora.tuners.matching import is_target, rules_for

    rules = rules_for(LoraConfig(**kwargs))
    theirs = peft.LoraConfig(**kwargs)
    for name in NAMES:
        expected = bool(check_target_module_exists(theirs, name))
        if kwargs.get("modules_to_save") and name in kwargs["modules_to_save"]:
            expected = False  # PEFT skips modules_to_save in its injection loop, as we do here
        assert bool(is_target(rules, name)) == expected, name
