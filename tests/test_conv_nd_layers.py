"""LoRA on nn.Conv1d and nn.Conv3d against the real PEFT layers (outputs, gradients, merging,
files both ways), the lora_conv3d operator against a pure-PyTorch formula, and the C++ loader's
refusal of these adapters."""

import copy
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import layer as peft_layers
from torch import nn

import torchlora
from torchlora import _native, ops

LAYERS = {1: (nn.Conv1d, peft_layers.Conv1d, torchlora.nn.LoraConv1d),
          3: (nn.Conv3d, peft_layers.Conv3d, torchlora.nn.LoraConv3d)}


def make_pair(dims, base, adapter="default", **options):
    """A PEFT layer and a torchlora layer around copies of ``base`` with PEFT's adapter weights."""
    _, peft_cls, ours_cls = LAYERS[dims]
    keys = ("lora_dropout", "lora_bias", "use_rslora", "init_lora_weights", "use_dora")
    cfg = LoraConfig(**{k: v for k, v in options.items() if k in keys})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_cls(copy.deepcopy(base), adapter, config=cfg, r=options["r"], lora_alpha=options["lora_alpha"])
        ours = ours_cls(copy.deepcopy(base), adapter, **options)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def spatial(dims, size):
    return (size,) * dims


def check_forward_backward(theirs, ours, x):
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt, yo = theirs(xt), ours(xo)
    torch.testing.assert_close(yo, yt, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(yt)
    yt.backward(grad)
    yo.backward(grad)
    torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-5, atol=1e-5)
    named = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert p.requires_grad == named[name].requires_grad, name
        if named[name].grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, named[name].grad, rtol=1e-5, atol=1e-5, msg=name)


CASES = [
    dict(kernel=3, stride=1, padding=1, groups=1, bias=True),
    dict(kernel=3, stride=2, padding=0, groups=1, bias=False),
    dict(kernel=1, stride=1, padding=0, groups=1, bias=True),
    dict(kernel=3, stride=1, padding="same", groups=1, bias=True),
    dict(kernel=2, stride=1, padding="valid", groups=2, bias=True),
]


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("lora_bias", [False, True])
def test_forward_and_gradients_match_peft(dims, case, lora_bias):
    conv_cls = LAYERS[dims][0]
    base = conv_cls(4, 6, case["kernel"], stride=case["stride"], padding=case["padding"], groups=case["groups"],
                    bias=case["bias"])
    theirs, ours = make_pair(dims, base, r=4, lora_alpha=8, init_lora_weights=False, lora_bias=lora_bias)
    x = torch.randn(2, 4, *spatial(dims, 6 if dims == 3 else 9))
    check_forward_backward(theirs, ours, x)


@pytest.mark.parametrize("dims", [1, 3])
def test_unbatched_input_rslora_and_two_adapters(dims):
    conv_cls = LAYERS[dims][0]
    base = conv_cls(3, 5, 3, padding=1)
    theirs, ours = make_pair(dims, base, r=2, lora_alpha=6, use_rslora=True, init_lora_weights=False)
    cfg = LoraConfig(r=3, lora_alpha=3, init_lora_weights=False)
    theirs.update_layer("other", 3, lora_alpha=3, config=cfg)
    ours.update_layer("other", 3, 3, init_lora_weights=False)
    ours.load_state_dict(theirs.state_dict())
    for layer in (theirs, ours):
        layer.set_adapter(["default", "other"])
    check_forward_backward(theirs, ours, torch.randn(3, *spatial(dims, 5)))


@pytest.mark.parametrize("dims", [1, 3])
def test_merge_unmerge_match_peft(dims):
    conv_cls = LAYERS[dims][0]
    base = conv_cls(4, 6, 3, stride=2, padding=1)
    theirs, ours = make_pair(dims, base, r=4, lora_alpha=8, init_lora_weights=False, lora_bias=True)
    x = torch.randn(2, 4, *spatial(dims, 7))
    with torch.no_grad():
        unmerged = ours(x)
        torch.testing.assert_close(ours.get_delta_weight("default"), theirs.get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-6)
        theirs.merge(safe_merge=True)
        ours.merge(safe_merge=True)
        torch.testing.assert_close(ours.get_base_layer().weight, theirs.get_base_layer().weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.get_base_layer().bias, theirs.get_base_layer().bias, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), unmerged, rtol=1e-4, atol=1e-5)
        theirs.unmerge()
        ours.unmerge()
        torch.testing.assert_close(ours.get_base_layer().weight, base.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), unmerged, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", [1, 3])
def test_groups_rules_as_peft(dims):
    conv_cls, peft_cls, ours_cls = LAYERS[dims]
    with pytest.raises(ValueError, match="divisible by groups"):
        ours_cls(conv_cls(4, 4, 3, groups=2), r=3, lora_alpha=3)
    with pytest.warns(UserWarning, match="groups > 1"):
        layer = ours_cls(conv_cls(4, 4, 3, groups=2), r=2, lora_alpha=2, init_lora_weights=False)
    assert layer.lora_B["default"].groups == 2 and layer.lora_B["default"].weight.shape == (4, 1) + (1,) * dims
    with pytest.raises(NotImplementedError, match="groups > 1"):
        layer.merge()


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_dora_matches_peft(dims, bias):
    conv_cls = LAYERS[dims][0]
    base = conv_cls(4, 6, 3, stride=2, padding=1, bias=bias)
    theirs, ours = make_pair(dims, base, r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)
    assert ours.lora_magnitude_vector["default"].weight.shape == (1, 6) + (1,) * dims
    x = torch.randn(2, 4, *spatial(dims, 7))
    check_forward_backward(theirs, ours, x)
    with torch.no_grad():
        unmerged = ours(x)
        theirs.merge()
        ours.merge()
        torch.testing.assert_close(ours.get_base_layer().weight, theirs.get_base_layer().weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), unmerged, rtol=1e-4, atol=1e-5)
        ours.unmerge()
        torch.testing.assert_close(ours.get_base_layer().weight, base.weight, rtol=1e-5, atol=1e-6)


class SeededDropout(nn.Module):
    """Dropout with torchlora's counter-based mask for a given seed, put into PEFT's layer so
    that both libraries drop the same elements."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return ops.dropout_apply(x, self.p, self.seed)


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_matches_peft_with_the_same_mask(dims, use_dora):
    conv_cls = LAYERS[dims][0]
    base = conv_cls(4, 6, 3, padding=1)
    theirs, ours = make_pair(dims, base, r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False,
                             use_dora=use_dora, lora_bias=not use_dora)
    x = torch.randn(2, 4, *spatial(dims, 5))
    torch.manual_seed(7)
    theirs.lora_dropout["default"] = SeededDropout(0.3, ops.make_seed("cpu"))
    theirs.train()
    ours.train()
    torch.manual_seed(7)  # ours draws the same seed in its forward
    check_forward_backward(theirs, ours, x)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Conv1d(3, 6, 3, padding=1)
        self.vol = nn.Conv3d(3, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.head = nn.Linear(6 + 4, 2)

    def forward(self, seq, vol):
        a = self.seq(seq).mean(-1)
        b = self.vol(vol).mean((-1, -2, -3))
        return self.head(torch.cat([a, b], -1))


def conv_net(seed=0):
    torch.manual_seed(seed)
    return ConvNet()


def conv_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 2, 6, 6, generator=g)


def conv_config(lib, **kw):
    return lib.LoraConfig(target_modules=["seq", "vol"], r=4, lora_alpha=8, init_lora_weights=False, **kw)


def test_model_outputs_gradients_and_files_match_peft(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(conv_net(), conv_config(peft))
        ours = torchlora.get_peft_model(conv_net(), conv_config(torchlora))
    assert isinstance(ours.base_model.model.seq, torchlora.nn.LoraConv1d)
    assert isinstance(ours.base_model.model.vol, torchlora.nn.LoraConv3d)
    torchlora.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref))
    seq, vol = conv_inputs()
    yr, yo = ref(seq, vol), ours(seq, vol)
    torch.testing.assert_close(yo, yr, rtol=1e-5, atol=1e-5)
    yr.sum().backward()
    yo.sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-5, msg=name)

    ref.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours_file) == sorted(theirs_file)
    assert ours_file["base_model.model.seq.lora_B.weight"].shape == (6, 4, 1)
    assert ours_file["base_model.model.vol.lora_A.weight"].shape == (4, 3, 1, 3, 3)
    for key in theirs_file:
        torch.testing.assert_close(ours_file[key], theirs_file[key], rtol=0, atol=0, msg=key)

    # each library loads the other's folder and computes the same outputs
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_ours = torchlora.PeftModel.from_pretrained(conv_net(), tmp_path / "peft")
        loaded_ref = peft.PeftModel.from_pretrained(conv_net(), tmp_path / "ours")
        torch.testing.assert_close(loaded_ours(seq, vol), loaded_ref(seq, vol), rtol=1e-5, atol=1e-5)
        merged = loaded_ours.merge_and_unload()
        assert isinstance(merged.vol, nn.Conv3d) and isinstance(merged.seq, nn.Conv1d)
        torch.testing.assert_close(merged(seq, vol), loaded_ref(seq, vol), rtol=1e-4, atol=1e-5)


def test_mixed_batch_per_sample_adapters():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = torchlora.get_peft_model(conv_net(), conv_config(torchlora))
        ours.add_adapter("other", conv_config(torchlora, lora_dropout=0.0))
    ours.eval()
    seq, vol = conv_inputs()
    with torch.no_grad():
        mixed = ours(seq, vol, adapter_names=["default", "other"])
        ours.set_adapter("other")
        second = ours(seq, vol)
        ours.set_adapter("default")
        first = ours(seq, vol)
    torch.testing.assert_close(mixed[0], first[0])
    torch.testing.assert_close(mixed[1], second[1])


# ---------------------------------------------------------------------- the lora_conv3d operator
def conv3d_reference(x, base_out, A, B, bias, stride, padding, dilation, groups, scaling, p=0.0, seed=None):
    dropped = ops.dropout_apply(x, p, seed) if p > 0 else x
    h = F.conv3d(dropped, A, None, stride, padding, dilation)
    return base_out + scaling * F.conv3d(h, B, bias, 1, 0, 1, groups)


def conv3d_operands(dtype=torch.float32, groups=1, lora_bias=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 5, 5, generator=g, dtype=dtype)
    A = torch.randn(4, 4, 2, 3, 3, generator=g, dtype=dtype)
    B = torch.randn(6, 4 // groups, 1, 1, 1, generator=g, dtype=dtype)
    bias = torch.randn(6, generator=g, dtype=dtype) if lora_bias else None
    base_out = torch.randn(2, 6, 2, 3, 3, generator=g, dtype=dtype)
    return x, base_out, A, B, bias, (1, 2, 2), (0, 1, 1), (1, 1, 1), groups


@pytest.mark.parametrize("groups", [1, 2])
def test_lora_conv3d_matches_formula(groups):
    args = conv3d_operands(groups=groups)
    out = ops.lora_conv3d(*args, 0.5)
    torch.testing.assert_close(out, conv3d_reference(*args, 0.5), rtol=1e-5, atol=1e-5)


def test_lora_conv3d_gradcheck_with_dropout():
    x, base_out, A, B, bias, *geometry = conv3d_operands(torch.float64, lora_bias=True)
    seed = ops.make_seed()
    inputs = [t.requires_grad_() for t in (x, base_out, A, B, bias)]
    assert torch.autograd.gradcheck(lambda *t: ops.lora_conv3d(*t, *geometry, 0.7, 0.25, seed), inputs)
    out = ops.lora_conv3d(*inputs, *geometry, 0.7, 0.25, seed)
    torch.testing.assert_close(out, conv3d_reference(*inputs, *geometry, 0.7, 0.25, seed))


def test_lora_conv3d_opcheck_and_compile():
    x, base_out, A, B, bias, stride, padding, dilation, groups = conv3d_operands()
    torch.library.opcheck(torch.ops.torchlora.lora_conv3d.default,
                          (x, base_out, A, B, bias, list(stride), list(padding), list(dilation), groups, 0.5, 0.0,
                           None))
    compiled = torch.compile(lambda *t: ops.lora_conv3d(*t, stride, padding, dilation, groups, 0.5),
                             fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, base_out, A, B, bias), ops.lora_conv3d(x, base_out, A, B, bias, stride,
                                                                                   padding, dilation, groups, 0.5))
    with torch.device("meta"):
        meta = [t.to("meta") if t is not None else None for t in (x, base_out, A, B, bias)]
    assert ops.lora_conv3d(*meta, stride, padding, dilation, groups, 0.5).shape == base_out.shape


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "base_out": a["base_out"][:, :, :1]}, "base_out is"),
    (lambda a: {**a, "B": a["B"][:, :3]}, "lora_B is"),
    (lambda a: {**a, "A": a["A"].double()}, "lora_A"),
    (lambda a: {**a, "stride": (1, 0, 1)}, "stride must be positive"),
    (lambda a: {**a, "x": a["x"][0]}, "x must be 5-D"),
])
def test_lora_conv3d_rejects_bad_operands(change, message):
    x, base_out, A, B, bias, stride, padding, dilation, groups = conv3d_operands()
    args = change(dict(x=x, base_out=base_out, A=A, B=B, bias=bias, stride=stride))
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        ops.lora_conv3d(args["x"], args["base_out"], args["A"], args["B"], args["bias"], args["stride"], padding,
                        dilation, groups, 0.5)


@pytest.mark.parametrize("dims", [1, 3])
def test_delta_weight_operator_takes_conv_factors(dims):
    A = torch.randn(4, 3, *(2,) * dims)
    B = torch.randn(5, 4, *(1,) * dims)
    delta = ops.lora_delta_weight(A, B, 0.5)
    conv = F.conv1d if dims == 1 else F.conv3d
    torch.testing.assert_close(delta, conv(A.transpose(0, 1), B).transpose(0, 1) * 0.5, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- the C++ loader
def test_cpp_loader_names_conv1d_and_conv3d_adapters(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("seq", "vol"):
            only = peft.LoraConfig(target_modules=[name], r=4, lora_alpha=8, init_lora_weights=False)
            peft.get_peft_model(conv_net(), only).save_pretrained(tmp_path / name)
    for name, kind in (("seq", "Conv1d"), ("vol", "Conv3d")):
        with pytest.raises(NotImplementedError, match=f"'{name}' is a {kind} adapter"):
            _native._C.cpp.load_peft_adapter(str(tmp_path / name))
