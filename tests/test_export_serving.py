"""torchlora.export: a PEFT model exported with torch.export + AOTInductor whose LoRA layers read
slot stacks given as inputs. The .pt2 is loaded with torch._inductor.aoti_load_package, its
stacks are filled by hand from adapters saved by the real peft (8 adapters of different ranks and
targets), and every row of mixed batches (rows without adapter included) must equal peft running
that row's adapter alone. One package per model, shared by the tests (each compile is slow)."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import tiny_models as tm
import torchlora
from serving_adapters import AdapterSpec, HandStacks, count_lora_layers, peft_reference, peft_rows, save_peft_adapters
from torchlora.export import METADATA_KEY, export_for_serving, export_program

TOL = dict(rtol=1e-5, atol=5e-5)
MAX_LORAS, MAX_RANK = 8, 8
SERVED = ("query", "value", "word_embeddings")
SPECS = [
    AdapterSpec("a0", 1, 2, ("query",)),
    AdapterSpec("a1", 2, 4, ("value",)),
    AdapterSpec("a2", 3, 3, ("query", "value")),
    AdapterSpec("a3", 4, 16, ("word_embeddings",)),
    AdapterSpec("a4", 5, 10, ("query", "word_embeddings"), rslora=True),
    AdapterSpec("a5", 6, 6, ("value", "word_embeddings")),
    AdapterSpec("a6", 7, 21, ("query", "value", "word_embeddings")),
    AdapterSpec("a7", 8, 8, ("query", "value")),
]


def _bert():
    return tm.bert()


def _inputs(batch: int, length: int, seed: int = 1) -> dict:
    ids = tm.input_ids(batch, length, seed=seed)
    mask = torch.ones_like(ids)
    mask[1::3, -2:] = 0  # padded rows
    return {"input_ids": ids, "attention_mask": mask}


def _both_outputs(out):
    return out.last_hidden_state, out.pooler_output


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    folders = save_peft_adapters(_bert, SPECS, str(root / "adapters"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the model to export: its LoRA layers name the served layers (its own adapter is not exported)
        model = peft.get_peft_model(_bert(), peft.LoraConfig(r=2, target_modules=list(SERVED)))
    before = {n: (type(m), m.training) for n, m in model.named_modules()}
    result = export_for_serving(model, _inputs(3, 7), root / "bert.pt2", MAX_LORAS, MAX_RANK)
    after = {n: (type(m), m.training) for n, m in model.named_modules()}
    runner = torch._inductor.aoti_load_package(result.package_path)
    ref = peft_reference(_bert, folders)
    return dict(result=result, runner=runner, ref=ref, folders=folders, model=model, before=before, after=after)


def _run(runner, inputs: dict, slots: list[int], request_scale: torch.Tensor, stacks: HandStacks):
    flat = [inputs["input_ids"], inputs["attention_mask"], torch.tensor(slots, dtype=torch.int64), request_scale]
    return runner(*(flat + stacks.flat()))


def _filled(served, order: list[str]) -> HandStacks:
    stacks = HandStacks(served["result"].metadata)
    for slot, name in enumerate(order):
        stacks.fill(slot, served["folders"][name], served["ref"], name)
    return stacks


def _check_rows(outputs, expected_rows) -> None:
    for i, expected in enumerate(expected_rows):
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(got[i:i + 1], want, **TOL, msg=lambda m: f"row {i}: {m}")


@pytest.mark.parametrize("batch,length,seed", [(10, 7, 1), (5, 11, 2)])
def test_mixed_batches_match_peft_row_by_row(served, batch, length, seed):
    order = ["a3", "a0", "a7", "a5", "a1", "a6", "a2", "a4"]
    stacks = _filled(served, order)
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(-1, MAX_LORAS, (batch,), generator=g).tolist()
    slots[0], slots[-1] = -1, 7  # a row without adapter and one with the last slot in every batch
    if batch >= MAX_LORAS + 2:
        slots[1:MAX_LORAS + 1] = range(MAX_LORAS)  # every adapter in the batch
    inputs = _inputs(batch, length, seed)
    outputs = _run(served["runner"], inputs, slots, torch.ones(MAX_LORAS), stacks)
    assert len(outputs) == 2
    expected = peft_rows(served["ref"], inputs, [order[s] if s >= 0 else None for s in slots], output=_both_outputs)
    _check_rows(outputs, expected)


def test_request_scale_multiplies_the_adapter_scaling(served):
    order = ["a6", "a4", "a2"]
    stacks = _filled(served, order)
    request_scale = torch.ones(MAX_LORAS)
    request_scale[0], request_scale[1] = 0.5, 2.0
    slots = [0, 1, 2, -1]
    inputs = _inputs(4, 6)
    outputs = _run(served["runner"], inputs, slots, request_scale, stacks)
    expected = peft_rows(served["ref"], inputs, ["a6", "a4", "a2", None], row_scales=[0.5, 2.0, 1.0, 1.0],
                         output=_both_outputs)
    _check_rows(outputs, expected)
    plain = _run(served["runner"], inputs, slots, torch.ones(MAX_LORAS), stacks)
    assert not torch.allclose(plain[0][0], outputs[0][0])  # the scale took effect


def test_swapping_slot_contents_changes_outputs_without_recompiling(served):
    path = served["result"].package_path
    stamp = os.stat(path).st_mtime_ns
    inputs = _inputs(3, 7)
    slots = [0, 0, -1]
    stacks = _filled(served, ["a7"])
    first = _run(served["runner"], inputs, slots, torch.ones(MAX_LORAS), stacks)
    stacks.fill(0, served["folders"]["a1"], served["ref"], "a1")
    second = _run(served["runner"], inputs, slots, torch.ones(MAX_LORAS), stacks)
    assert not torch.allclose(first[0][:2], second[0][:2])
    _check_rows(first, peft_rows(served["ref"], inputs, ["a7", "a7", None], output=_both_outputs))
    _check_rows(second, peft_rows(served["ref"], inputs, ["a1", "a1", None], output=_both_outputs))
    stacks.clear(0)  # an emptied slot is the base model
    third = _run(served["runner"], inputs, slots, torch.ones(MAX_LORAS), stacks)
    _check_rows(third, peft_rows(served["ref"], inputs, [None, None, None], output=_both_outputs))
    assert os.stat(path).st_mtime_ns == stamp


def test_metadata_is_the_documented_format(served):
    ref_layers = []
    base = served["model"].base_model.model
    for name, module in base.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            weight = module.get_base_layer().weight
            kind = "embedding" if isinstance(module.get_base_layer(), nn.Embedding) else "linear"
            ref_layers.append({"name": name, "kind": kind, "weight_shape": list(weight.shape), "groups": 1})
    expected = {"format": 1, "num_model_inputs": 2, "max_loras": MAX_LORAS, "max_lora_rank": MAX_RANK,
                "lora_bias": False, "dtype": "float32", "device": "cpu", "layers": ref_layers}
    text = served["runner"].get_metadata()[METADATA_KEY]
    assert json.loads(text) == expected
    assert list(json.loads(text)) == list(expected)  # key order as documented
    assert len(ref_layers) == 5 and ref_layers[0]["name"] == "embeddings.word_embeddings"
    result = served["result"]
    assert result.layers == [layer["name"] for layer in ref_layers]
    assert result.export_seconds > 0 and result.compile_seconds > 0
    # 2 model inputs, sample_slots, request_scale, then A, B, scale per layer
    in_spec = pytree.treespec_loads(served["runner"].loader.get_call_spec()[0])
    assert in_spec.num_leaves == 2 + 2 + 3 * len(ref_layers)


def test_the_callers_model_is_left_as_it_was(served):
    assert served["before"] == served["after"]
    assert count_lora_layers(served["model"]) == 5


def test_the_cpp_loader_serves_the_package_from_a_pool(served):
    """The package as torchlora::serve::ExportedModel reads it: its pool loads the peft folders and
    one forward serves a mixed batch with per-request scales."""
    serve = torchlora._C.serve
    exported = serve.ExportedModel(served["result"].package_path)
    info = exported.info
    assert (info["num_model_inputs"], info["max_loras"], info["max_lora_rank"]) == (2, MAX_LORAS, MAX_RANK)
    assert [layer.name for layer in info["layers"]] == served["result"].layers
    pool = exported.make_pool()
    for name, folder in served["folders"].items():
        pool.load(name, folder)
    rows = ["a2", None, "a6", "a0", "a6", "a3", None, "a7", "a5"]
    scales = [1.0, 1.0, 0.5, 2.0, 0.5, 1.0, 1.0, 1.0, 1.5]
    inputs = _inputs(len(rows), 6, seed=5)
    with pool.acquire([(name or "", scale) for name, scale in zip(rows, scales)]) as lease:
        outputs = exported.forward([inputs["input_ids"], inputs["attention_mask"]], pool, lease)
    expected = peft_rows(served["ref"], inputs, rows, row_scales=scales, output=_both_outputs)
    _check_rows(outputs, expected)


# ---------------------------------------------------------------------- a plain module with target_modules
PLAIN_SPECS = [
    AdapterSpec("p0", 2, 4, ("emb", "conv", "lin0")),
    AdapterSpec("p1", 4, 4, ("conv",)),
    AdapterSpec("p2", 1, 3, ("emb", "lin0")),
]


def test_plain_module_with_target_modules_linear_embedding_conv2d(tmp_path):
    folders = save_peft_adapters(tm.plain_mlp, PLAIN_SPECS, str(tmp_path / "adapters"))
    model = tm.plain_mlp()
    ids = tm.input_ids(4, 6)
    # the model slices the token dim ([:, :4]), so only the batch is dynamic here
    batch = torch.export.Dim("batch")
    result = export_for_serving(model, (ids,), tmp_path / "plain.pt2", 4, 4, target_modules=["emb", "conv", "lin0"],
                                dynamic_shapes=[{0: batch}])
    assert [(l["name"], l["kind"]) for l in result.metadata["layers"]] == [
        ("emb", "embedding"), ("conv", "conv2d"), ("lin0", "linear")]
    assert all(type(m).__module__.startswith("torch.nn") or m is model for m in model.modules())
    runner = torch._inductor.aoti_load_package(result.package_path)
    ref = peft_reference(tm.plain_mlp, folders)
    stacks = HandStacks(result.metadata)
    for slot, name in enumerate(["p0", "p1", "p2"]):
        stacks.fill(slot, folders[name], ref, name)
    for rows in ([2, -1, 0, 1, 1], [0, 1, 2]):
        ids = tm.input_ids(len(rows), 6, seed=len(rows))
        out = runner(ids, torch.tensor(rows), torch.ones(4), *stacks.flat())
        expected = peft_rows(ref, {"ids": ids}, [["p0", "p1", "p2"][s] if s >= 0 else None for s in rows],
                             output=lambda o: (o,))
        _check_rows(out, expected)


# ---------------------------------------------------------------------- the exported program (no compile)
def test_lora_bias_stacks_are_inputs_after_the_factors(tmp_path):
    """lora_bias=True: every layer takes lora_A, lora_B, lora_bias, scale; checked on the exported
    program (torch.export only) against peft with lora_bias adapters."""
    def build():
        return tm.llama(attention_bias=True)

    specs = [AdapterSpec("b0", 2, 4, ("q_proj", "v_proj")), AdapterSpec("b1", 3, 3, ("v_proj",))]
    folders = {}
    for index, spec in enumerate(specs):
        torch.manual_seed(200 + index)
        config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                                 lora_bias=True, init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = peft.get_peft_model(build(), config)
        for name, p in m.named_parameters():
            if ".lora_B." in name and name.endswith(".bias"):
                torch.nn.init.normal_(p.data)  # peft zero-initialises lora_bias
        folders[spec.name] = str(tmp_path / spec.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft takes a 1-d lora_bias for an unsharded-save symptom
            m.save_pretrained(folders[spec.name])
    ours = torchlora.get_peft_model(build(), torchlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = tm.input_ids(3, 5)
    with pytest.raises(TypeError, match="model_kwargs={'use_cache': False}"):
        export_program(ours, (ids,), 2, 4, lora_bias=True)  # the model returns its cache
    program, metadata = export_program(ours, {"input_ids": ids}, 2, 4, lora_bias=True,
                                       model_kwargs={"use_cache": False})
    assert metadata["lora_bias"] is True and len(metadata["layers"]) == 4
    assert len(program.graph_signature.user_inputs) == 1 + 2 + 4 * 4
    ref = peft_reference(build, folders)
    stacks = HandStacks(metadata)
    stacks.fill(0, folders["b0"], ref, "b0")
    stacks.fill(1, folders["b1"], ref, "b1")
    rows = [1, -1, 0, 0]
    ids = tm.input_ids(4, 6, seed=3)
    out = program.module()(ids, torch.tensor(rows), torch.ones(2), *stacks.flat())
    expected = peft_rows(ref, {"input_ids": ids}, ["b1", None, "b0", "b0"], output=lambda o: (o.logits,))
    _check_rows(out, expected)


# ---------------------------------------------------------------------- bad arguments
@pytest.fixture()
def small_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(tm.plain_mlp(), peft.LoraConfig(r=2, target_modules=["lin0"]))


def _export(model, tmp_path, **kw):
    args = dict(example_inputs=(tm.input_ids(2, 6),), package_path=tmp_path / "x.pt2", max_loras=2, max_lora_rank=4)
    args.update(kw)
    return export_for_serving(model, **args)


def test_no_lora_layers_and_no_target_modules(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers and no target_modules"):
        _export(tm.plain_mlp(), tmp_path)


def test_target_modules_matching_nothing(tmp_path):
    with pytest.raises(ValueError, match="matches no module"):
        _export(tm.plain_mlp(), tmp_path, target_modules=["nothing_here"])


def test_target_modules_with_a_lora_model(tmp_path, small_peft):
    with pytest.raises(ValueError, match="target_modules is for plain modules"):
        _export(small_peft, tmp_path, target_modules=["lin0"])


def test_unsupported_target_type(tmp_path):
    with pytest.raises(TypeError, match="'relu' is a ReLU"):
        _export(tm.plain_mlp(), tmp_path, target_modules=["relu"])


@pytest.mark.parametrize("kw,error,match", [
    (dict(max_lora_rank=0), ValueError, "max_lora_rank must be >= 1"),
    (dict(max_loras=0), ValueError, "max_loras must be >= 1"),
    (dict(max_loras=2.0), TypeError, "max_loras must be an int"),
    (dict(max_lora_rank=True), TypeError, "max_lora_rank must be an int"),
    (dict(lora_bias=1), TypeError, "lora_bias must be a bool"),
    (dict(package_path="model.zip"), ValueError, "must end with .pt2"),
    (dict(package_path=3), TypeError, "package_path must be a path"),
    (dict(example_inputs=()), ValueError, "example_inputs is empty"),
    (dict(example_inputs=("ids",)), TypeError, "example input 0 must be a tensor"),
    (dict(example_inputs=(tm.input_ids(2, 6), torch.ones(3, 2))), ValueError, "different batch sizes"),
    (dict(example_inputs=(tm.input_ids(1, 6),)), ValueError, "at least 2"),
    (dict(dynamic_shapes=[{0: torch.export.Dim("b")}, None]), ValueError, "2 entries for 1 example inputs"),
    (dict(dynamic_shapes=[{5: torch.export.Dim("b")}]), ValueError, "names dim 5"),
    (dict(dynamic_shapes="batch"), TypeError, "dynamic_shapes must be a sequence"),
    (dict(model_kwargs={"x": torch.ones(1)}), TypeError, "are tensors"),
    (dict(model_kwargs=[1]), TypeError, "model_kwargs must be a mapping"),
])
def test_bad_arguments(tmp_path, small_peft, kw, error, match):
    with pytest.raises(error, match=match):
        _export(small_peft, tmp_path, **kw)


def test_dora_layers_are_rejected(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tm.plain_mlp(), peft.LoraConfig(r=2, target_modules=["lin0"], use_dora=True))
    with pytest.raises(ValueError, match="'lin0' uses DoRA"):
        _export(model, tmp_path)


def test_merged_layers_are_rejected(tmp_path, small_peft):
    small_peft.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters; unmerge"):
        _export(small_peft, tmp_path)
    small_peft.unmerge_adapter()


def test_not_a_module(tmp_path):
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        _export(lambda x: x, tmp_path)


class _PackedWeight(nn.Parameter):
    """Stands for a quantized parameter class (bitsandbytes Params4bit / Int8Params subclass Parameter)."""


def test_quantized_base_weights_are_rejected(tmp_path):
    model = tm.plain_mlp()
    model.lin0.weight = _PackedWeight(model.lin0.weight.detach().clone())
    with pytest.raises(TypeError, match="'lin0' .* holds a _PackedWeight weight.*plain floating-point"):
        _export(model, tmp_path, target_modules=["lin0"])
    model.lin0.weight = nn.Parameter(torch.zeros_like(model.lin0.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="dtype torch.int8"):
        _export(model, tmp_path, target_modules=["lin0"])
