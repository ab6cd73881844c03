"""Mixed batches through the layers and models: one multi-adapter operator per layer whatever the
number of adapters, several adapters trained in one batch (each sample's gradient reaching only
its own adapter, equal to training each alone), the cached adapter stacks following every change
of the adapters, and torch.compile with the slots as a tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tiny_models as tm
import torchlora
from torchlora.nn import LoraConv2d, LoraEmbedding, LoraLinear


def _count_ops(fn, name: str = "torchlora::linear_with_multi_lora") -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == name)


def _llama_with_adapters(n: int, seed: int = 0):
    model = torchlora.get_peft_model(
        tm.llama(seed), torchlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", torchlora.LoraConfig(r=2 + i % 5, lora_alpha=4 + i, use_rslora=i % 2 == 1,
                                                        target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model.eval()


@pytest.mark.parametrize("adapters", [3, 17])
def test_one_operator_per_layer_whatever_the_number_of_adapters(adapters):
    model = _llama_with_adapters(adapters)
    ids = tm.input_ids(batch=adapters + 1)
    names = [f"a{i}" for i in range(adapters)] + ["__base__"]
    lora_layers = sum(isinstance(m, LoraLinear) for m in model.modules())
    with torch.no_grad():
        assert _count_ops(lambda: model(input_ids=ids, adapter_names=names)) == lora_layers


def test_rows_follow_their_adapter_in_a_model():
    model = _llama_with_adapters(4)
    ids = tm.input_ids(batch=5)
    names = ["a2", "__base__", "a0", "a3", "a2"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[i : i + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[i : i + 1]).logits
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def _grads(model, names):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and names(n)}


def test_training_several_adapters_in_one_batch_equals_training_each_alone():
    model = _llama_with_adapters(3).train()
    model.base_model.set_adapter(["a0", "a1", "a2"])
    ids = tm.input_ids(batch=6)
    names = ["a1", "a0", "a1", "__base__", "a2", "a0"]
    out = model(input_ids=ids, adapter_names=names).logits
    out.pow(2).sum().backward()
    mixed = _grads(model, lambda n: "lora_" in n)
    assert mixed, "no adapter received a gradient"
    for adapter in ("a0", "a1", "a2"):
        model.zero_grad(set_to_none=True)
        rows = [i for i, n in enumerate(names) if n == adapter]
        model.base_model.set_adapter(adapter)
        model(input_ids=ids[rows]).logits.pow(2).sum().backward()
        alone = _grads(model, lambda n, a=adapter: f".{a}." in n)
        assert alone
        for key, grad in alone.items():
            torch.testing.assert_close(mixed[key], grad, atol=1e-5, rtol=1e-4, msg=key)
        model.base_model.set_adapter(["a0", "a1", "a2"])


def test_training_with_dropout_keeps_gradients_per_adapter():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 10), "a", r=4, lora_dropout=0.3, init_lora_weights=False)
    layer.update_layer("b", 3, 6, lora_dropout=0.1, init_lora_weights=False)
    layer.update_layer("c", 2, 2, lora_dropout=0.0, init_lora_weights=False)
    layer.set_adapter(["a", "b", "c"])
    layer.train()
    x = torch.randn(6, 5, 12)
    layer(x, adapter_names=["a", "a", "b", "__base__", "b", "a"]).sum().backward()
    assert layer.lora_A["a"].weight.grad.abs().sum() > 0 and layer.lora_A["b"].weight.grad.abs().sum() > 0
    assert layer.lora_A["c"].weight.grad is None or layer.lora_A["c"].weight.grad.abs().sum() == 0
    layer.eval()
    with torch.no_grad():  # dropout off in eval: the mixed batch equals each adapter alone
        out = layer(x, adapter_names=["b", "a", "c", "__base__", "a", "b"])
        layer.set_adapter("a")
        torch.testing.assert_close(out[1], layer(x[1:2])[0])


def test_embedding_and_conv2d_layers_mixed_and_trained():
    torch.manual_seed(0)
    emb = LoraEmbedding(nn.Embedding(20, 8, padding_idx=0), "a", r=4, init_lora_weights=False)
    emb.update_layer("b", 2, 3, init_lora_weights=False)
    ids = torch.randint(0, 20, (3, 5))
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        out = emb(ids, adapter_names=names)
        for i, n in enumerate(names):
            if n != "__base__":
                emb.set_adapter(n)
                torch.testing.assert_close(out[i], emb(ids[i : i + 1])[0])
    conv = LoraConv2d(nn.Conv2d(4, 6, 3, padding=1, groups=2), "a", r=4, init_lora_weights=False)
    conv.update_layer("b", 2, 3, lora_bias=True, init_lora_weights=False)
    conv.lora_B["b"].bias.data.normal_()
    conv.eval()
    x = torch.randn(3, 4, 5, 5)
    with torch.no_grad():
        out = conv(x, adapter_names=["b", "a", "__base__"])
        for i, n in enumerate(["b", "a"]):
            conv.set_adapter(n)
            torch.testing.assert_close(out[i], conv(x[i : i + 1])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[2], conv.base_layer(x[2:3])[0])
    conv.train()
    conv.set_adapter(["a", "b"])
    conv(x, adapter_names=["b", "b", "__base__"]).sum().backward()
    assert conv.lora_A["b"].weight.grad.abs().sum() > 0
    assert conv.lora_A["a"].weight.grad is None or conv.lora_A["a"].weight.grad.abs().sum() == 0


def test_cached_stack_follows_changes_of_the_adapters():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 6), "a", r=2, init_lora_weights=False)
    layer.update_layer("b", 3, 3, init_lora_weights=False)
    layer.eval()
    x = torch.randn(2, 8)
    names = ["a", "b"]

    def check():
        with torch.no_grad():
            mixed = layer(x, adapter_names=names)
            for i, n in enumerate(names):
                layer.set_adapter(n)
                torch.testing.assert_close(mixed[i], layer(x[i : i + 1])[0])

    check()
    optimizer = torch.optim.SGD([layer.lora_B["a"].weight], lr=1.0)
    layer.lora_B["a"].weight.grad = torch.ones_like(layer.lora_B["a"].weight)
    optimizer.step()  # in place, under no_grad
    check()
    state = {k: torch.randn_like(v) for k, v in layer.state_dict().items() if "lora_" in k}
    layer.load_state_dict(state, strict=False)
    check()
    layer.scaling["b"] = 7.0
    check()
    layer.update_layer("c", 4, 4, init_lora_weights=False)
    names = ["c", "a"]
    check()
    layer.delete_adapter("c")
    names = ["b", "a"]
    check()
    layer.double()
    x = x.double()
    check()
    with torch.no_grad():
        layer.lora_A["a"].weight.mul_(2)  # in place: its version counter tells
    check()
    layer.lora_A["a"].weight.data = torch.randn_like(layer.lora_A["a"].weight)
    layer.refresh_adapter_stack()  # a replaced .data has no version to tell
    check()


def test_compiled_layer_takes_new_slots_and_weights_without_recompiling():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 12), "a", r=4, init_lora_weights=False)
    layer.update_layer("b", 6, 3, init_lora_weights=False)
    layer.eval()
    x = torch.randn(4, 3, 16)
    compiled = torch.compile(layer, fullgraph=True)
    slots = torch.tensor([0, -1, 1, 0])
    with torch.no_grad():
        expected = layer(x, adapter_names=["a", "__base__", "b", "a"])
        torch.testing.assert_close(compiled(x, adapter_slots=slots), expected)
        with torch._dynamo.config.patch(error_on_recompile=True):
            new_slots = torch.tensor([1, 1, -1, 0])
            layer.lora_B["b"].weight.add_(0.5)
            torch.testing.assert_close(compiled(x, adapter_slots=new_slots),
                                       layer(x, adapter_names=["b", "b", "__base__", "a"]))


def test_bad_mixed_batches_are_named():
    layer = LoraLinear(nn.Linear(8, 6), "a", r=2)
    layer.eval()
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 samples"):
        layer(x, adapter_names=["a", "a"])
    with pytest.raises(ValueError, match="unknown adapters"):
        layer(x, adapter_names=["a", "zz", "a"])
    with pytest.raises(TypeError, match="list of strings"):
        layer(x, adapter_names=["a", 3, "a"])
    with pytest.raises(TypeError, match="adapter_slots must be an int32 or int64 tensor"):
        layer(x, adapter_slots=[0, 0, 0])
    with pytest.raises(ValueError, match=r"adapter_slots must have shape \[3\]"):
        layer(x, adapter_slots=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="out of range"):
        layer(x, adapter_slots=torch.tensor([0, 1, 0]))
