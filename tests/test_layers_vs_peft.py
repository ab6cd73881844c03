"""torchlora.nn layers against the real PEFT layers: with PEFT's weights copied in, outputs
and gradients match; merge/unmerge, several adapters, init options, Conv1D."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import layer as peft_layers
from torch import nn
from transformers.pytorch_utils import Conv1D

import torchlora


def peft_pair(kind, base, adapter="default", **options):
    """A PEFT layer and a torchlora layer around copies of ``base`` with identical weights."""
    cfg = LoraConfig(**{k: v for k, v in options.items() if k in ("lora_dropout", "lora_bias", "use_rslora", "init_lora_weights", "fan_in_fan_out")})
    peft_cls = {"linear": peft_layers.Linear, "embedding": peft_layers.Embedding, "conv2d": peft_layers.Conv2d}[kind]
    ours_cls = {"linear": torchlora.LoraLinear, "embedding": torchlora.LoraEmbedding, "conv2d": torchlora.LoraConv2d}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_cls(copy.deepcopy(base), adapter, config=cfg, r=options["r"], lora_alpha=options["lora_alpha"])
    ours = ours_cls(copy.deepcopy(base), adapter, **options)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def assert_same_forward_backward(theirs, ours, x):
    xt = x.clone().requires_grad_(x.is_floating_point())
    xo = x.clone().requires_grad_(x.is_floating_point())
    yt, yo = theirs(xt), ours(xo)
    torch.testing.assert_close(yo, yt, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(yt)
    yt.backward(grad)
    yo.backward(grad)
    if x.is_floating_point():
        torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-5, atol=1e-5)
    named_theirs = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        q = named_theirs[name]
        assert p.requires_grad == q.requires_grad, name
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


LINEAR_OPTIONS = [
    dict(r=4, lora_alpha=8),
    dict(r=1, lora_alpha=3),
    dict(r=16, lora_alpha=32, use_rslora=True),
    dict(r=8, lora_alpha=16, lora_bias=True),
    dict(r=5, lora_alpha=7, init_lora_weights="gaussian"),
]


@pytest.mark.parametrize("options", LINEAR_OPTIONS)
@pytest.mark.parametrize("shape", [(3, 17), (2, 5, 17)])
def test_linear_matches_peft(options, shape):
    theirs, ours = peft_pair("linear", nn.Linear(17, 11), init_lora_weights=False, **{k: v for k, v in options.items() if k != "init_lora_weights"})
    assert_same_forward_backward(theirs, ours, torch.randn(*shape))


def test_layer_leaves_base_trainability_to_the_model():
    """As in PEFT, a layer makes its adapters trainable and leaves the base layer alone
    (get_peft_model freezes the base model)."""
    _, ours = peft_pair("linear", nn.Linear(6, 4), r=2, lora_alpha=2)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.default.weight", "lora_B.default.weight", "base_layer.weight", "base_layer.bias"}


def test_conv1d_gpt2_style_matches_peft():
    base = Conv1D(12, 9)  # nf=12 outputs, nx=9 inputs, weight [9, 12]
    theirs, ours = peft_pair("linear", base, r=4, lora_alpha=8, fan_in_fan_out=True, init_lora_weights=False)
    assert_same_forward_backward(theirs, ours, torch.randn(2, 3, 9))
    theirs.merge()
    ours.merge()
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight)


def test_conv1d_requires_fan_in_fan_out():
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        torchlora.LoraLinear(Conv1D(4, 3), r=2)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        torchlora.LoraLinear(nn.Linear(3, 4), r=2, fan_in_fan_out=True)


@pytest.mark.parametrize("vocab,dim,padding_idx", [(10, 4, None), (31, 7, 0), (50, 16, 49)])
@pytest.mark.parametrize("r", [1, 4])
def test_embedding_matches_peft(vocab, dim, padding_idx, r):
    base = nn.Embedding(vocab, dim, padding_idx=padding_idx)
    theirs, ours = peft_pair("embedding", base, r=r, lora_alpha=2 * r, init_lora_weights=False)
    assert_same_forward_backward(theirs, ours, torch.randint(0, vocab, (3, 6)))


def test_embedding_max_norm_and_scale_grad_by_freq_match_peft():
    base = nn.Embedding(12, 5, max_norm=1.0, scale_grad_by_freq=True)
    theirs, ours = peft_pair("embedding", base, r=3, lora_alpha=3, init_lora_weights=False)
    ids = torch.tensor([[1, 1, 2, 5], [0, 1, 11, 5]])
    assert_same_forward_backward(theirs, ours, ids)
    torch.testing.assert_close(ours.lora_embedding_A["default"], theirs.lora_embedding_A["default"])


CONV_CASES = [
    dict(kernel_size=1, stride=1, padding=0, groups=1),
    dict(kernel_size=3, stride=1, padding=1, groups=1),
    dict(kernel_size=3, stride=2, padding=1, groups=2),
    dict(kernel_size=5, stride=2, padding=2, groups=1),
    dict(kernel_size=(3, 5), stride=(1, 2), padding=(1, 2), groups=4),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_matches_peft(case, lora_bias, channels_last):
    base = nn.Conv2d(8, 12, **case)
    theirs, ours = peft_pair("conv2d", base, r=8, lora_alpha=4, lora_bias=lora_bias, init_lora_weights=False)
    x = torch.randn(2, 8, 11, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert_same_forward_backward(theirs, ours, x)


def test_conv2d_unbatched_input():
    theirs, ours = peft_pair("conv2d", nn.Conv2d(3, 5, 3, padding=1), r=2, lora_alpha=2, init_lora_weights=False)
    assert_same_forward_backward(theirs, ours, torch.randn(3, 7, 7))


def test_conv2d_rank_not_divisible_by_groups():
    with pytest.raises(ValueError, match="divisible by groups"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torchlora.LoraConv2d(nn.Conv2d(4, 4, 3, groups=2), r=3)


@pytest.mark.parametrize("kind,base,x", [
    ("linear", nn.Linear(9, 7), torch.randn(4, 9)),
    ("embedding", nn.Embedding(15, 6), torch.randint(0, 15, (2, 5))),
    ("conv2d", nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 6, 6)),
    ("linear", Conv1D(7, 9), torch.randn(4, 9)),
])
def test_merge_unmerge_equals_unmerged_forward(kind, base, x):
    options = dict(r=4, lora_alpha=6, init_lora_weights=False)
    if isinstance(base, Conv1D):
        options["fan_in_fan_out"] = True
    theirs, ours = peft_pair(kind, base, **options)
    with torch.no_grad():
        unmerged = ours(x)
        original = ours.base_layer.weight.clone()
        ours.merge()
        assert ours.merged
        torch.testing.assert_close(ours(x), unmerged, rtol=1e-5, atol=1e-5)
        theirs.merge()
        torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight)
        ours.unmerge()
        assert not ours.merged
        torch.testing.assert_close(ours.base_layer.weight, original, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours(x), unmerged, rtol=1e-5, atol=1e-5)


def test_lora_bias_merges_into_base_bias():
    _, ours = peft_pair("linear", nn.Linear(5, 3), r=2, lora_alpha=2, lora_bias=True, init_lora_weights=False)
    with torch.no_grad():
        ours.lora_B["default"].bias.normal_()
        x = torch.randn(4, 5)
        before = ours(x)
        ours.merge()
        torch.testing.assert_close(ours(x), before, rtol=1e-5, atol=1e-5)


def test_safe_merge_raises_on_non_finite_and_leaves_weights():
    _, ours = peft_pair("linear", nn.Linear(5, 3), r=2, lora_alpha=2, init_lora_weights=False)
    with torch.no_grad():
        ours.lora_B["default"].weight[0, 0] = float("inf")
    before = ours.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.merge(safe_merge=True)
    torch.testing.assert_close(ours.base_layer.weight, before)
    assert not ours.merged


def test_conv2d_with_groups_cannot_merge():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = torchlora.LoraConv2d(nn.Conv2d(4, 4, 3, groups=2), r=2)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        layer.merge()


@pytest.mark.parametrize("kind,make_base,make_x", [
    ("linear", lambda: nn.Linear(9, 7), lambda: torch.randn(4, 9)),
    ("embedding", lambda: nn.Embedding(15, 6), lambda: torch.randint(0, 15, (2, 5))),
    ("conv2d", lambda: nn.Conv2d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 6, 6)),
])
def test_several_adapters_match_peft(kind, make_base, make_x):
    base = make_base()
    theirs, ours = peft_pair(kind, base, r=4, lora_alpha=8, init_lora_weights=False)
    cfg = LoraConfig(r=2, lora_alpha=6, init_lora_weights=False)
    theirs.update_layer("other", 2, 6, config=cfg)
    ours.update_layer("other", 2, 6, init_lora_weights=False)
    ours.load_state_dict(theirs.state_dict())
    x = make_x()
    for active in (["default"], ["other"], ["default", "other"]):
        theirs.set_adapter(active)
        ours.set_adapter(active)
        assert_same_forward_backward(theirs, ours, x)
        assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
            n for n, p in theirs.named_parameters() if p.requires_grad
        }
    # merging both and unmerging restores the base layer
    with torch.no_grad():
        expected = ours(x)
        ours.merge()
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        ours.unmerge()
    ours.delete_adapter("default")
    assert ours.adapter_names() == ["other"] and ours.active_adapters == ["other"]


def test_disable_adapters_gives_base_output():
    _, ours = peft_pair("linear", nn.Linear(6, 4), r=2, lora_alpha=2, init_lora_weights=False)
    x = torch.randn(3, 6)
    ours.enable_adapters(False)
    torch.testing.assert_close(ours(x), ours.base_layer(x))
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n)
    ours.enable_adapters(True)
    assert not torch.allclose(ours(x), ours.base_layer(x))


def test_mixed_batch_matches_per_adapter_forward():
    theirs, ours = peft_pair("linear", nn.Linear(6, 4), r=2, lora_alpha=2, init_lora_weights=False)
    ours.update_layer("other", 3, 3, init_lora_weights=False)
    ours.eval()
    x = torch.randn(4, 6)
    names = ["other", "__base__", "default", "other"]
    out = ours(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            ours.enable_adapters(False)
        else:
            ours.enable_adapters(True)
            ours.set_adapter(name)
        torch.testing.assert_close(out[i], ours(x[i : i + 1])[0])
    with pytest.raises(ValueError, match="unknown adapters"):
        ours.enable_adapters(True)
        ours(x, adapter_names=["nope"] * 4)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_b_zero_makes_adapter_a_no_op(init):
    for layer, x in (
        (torchlora.LoraLinear(nn.Linear(8, 5), r=4, init_lora_weights=init), torch.randn(3, 8)),
        (torchlora.LoraEmbedding(nn.Embedding(9, 5), r=4, init_lora_weights=init), torch.randint(0, 9, (3,))),
        (torchlora.LoraConv2d(nn.Conv2d(3, 5, 3), r=4, init_lora_weights=init), torch.randn(1, 3, 6, 6)),
    ):
        torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_init_false_is_not_a_no_op_and_unknown_init_raises():
    layer = torchlora.LoraLinear(nn.Linear(8, 5), r=4, init_lora_weights=False)
    x = torch.randn(3, 8)
    assert not torch.allclose(layer(x), layer.base_layer(x))
    with pytest.raises(ValueError, match="init_lora_weights"):
        torchlora.LoraLinear(nn.Linear(8, 5), r=4, init_lora_weights="bogus")


@pytest.mark.parametrize("bad,error", [
    (dict(r=0), ValueError), (dict(r=-2), ValueError), (dict(r=2.5), TypeError), (dict(lora_alpha="8"), TypeError),
    (dict(lora_dropout=1.0), ValueError), (dict(lora_dropout=-0.1), ValueError), (dict(use_dora=1), TypeError),
    (dict(unknown_option=1), TypeError),
])
def test_layer_argument_errors(bad, error):
    with pytest.raises(error):
        torchlora.LoraLinear(nn.Linear(4, 4), **bad)
    with pytest.raises(TypeError, match="nn.Linear"):
        torchlora.LoraLinear(nn.Conv2d(2, 2, 1))


def test_dtype_and_dropout_in_training():
    layer = torchlora.LoraLinear(nn.Linear(16, 8).to(torch.bfloat16), r=4, lora_dropout=0.5, init_lora_weights=False)
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    x = torch.randn(64, 16, dtype=torch.bfloat16)
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    b = layer(x)
    torch.testing.assert_close(a, b)
    c = layer(x)
    assert not torch.equal(a, c)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    assert a.dtype == torch.bfloat16
