"""add_weighted_adapter against the real PEFT: every combination_type on Linear, Embedding, Conv2d
and transformers Conv1D (fan_in_fan_out) layers; the combined adapter's config, weights and
outputs; the dare_* random draws under one seed; files PEFT loads; PEFT's errors."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch

import torchlora

from peft_parity import copy_adapter, logits
from tiny_models import gpt2, input_ids, llama, plain_mlp

TOL = dict(rtol=1e-5, atol=1e-5)
ALL_TYPES = ["svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
             "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd"]
SVD_TYPES = {"svd", "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd"}
MLP_TARGETS = ["emb", "conv", "lin0"]


def _pair(builder, adapters: dict[str, dict]):
    """(PEFT model, torchlora model) holding the same adapters (random factors, B included)."""
    names = list(adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(builder(), peft.LoraConfig(init_lora_weights=False, **adapters[names[0]]),
                                  adapter_name=names[0])
        ours = torchlora.get_peft_model(builder(), torchlora.LoraConfig(init_lora_weights=False, **adapters[names[0]]),
                                        adapter_name=names[0])
        for name in names[1:]:
            ref.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **adapters[name]))
            ours.add_adapter(name, torchlora.LoraConfig(init_lora_weights=False, **adapters[name]))
    for name in names:
        copy_adapter(ref, ours, name)
    return ref, ours


def _mlp_pair(r_b: int = 2, **b_overrides):
    return _pair(plain_mlp, {"a": dict(r=2, lora_alpha=4, target_modules=MLP_TARGETS),
                             "b": dict(r=r_b, lora_alpha=3, target_modules=MLP_TARGETS, **b_overrides)})


def _both(ref, ours, seed: int = 7, **kwargs) -> None:
    torch.manual_seed(seed)
    ref.add_weighted_adapter(**kwargs)
    torch.manual_seed(seed)
    ours.add_weighted_adapter(**kwargs)


def _state(model, module, adapter: str) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.get_peft_model_state_dict(model, adapter_name=adapter).items()}


def _deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B @ A per module (sign and basis of SVD factors aside, what an adapter does)."""
    out = {}
    for key, a in state.items():
        for a_name, b_name in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_name):
                b = state[key[: -len(a_name)] + b_name]
                out[key[: -len(a_name)]] = b.flatten(1) @ a.flatten(1)
    return out


def _check_same_adapter(ref, ours, adapter: str, exact_factors: bool) -> None:
    ref_state, our_state = _state(ref, peft, adapter), _state(ours, torchlora, adapter)
    assert sorted(ref_state) == sorted(our_state)
    if exact_factors:
        for key in ref_state:
            torch.testing.assert_close(our_state[key], ref_state[key], **TOL, msg=key)
    ref_d, our_d = _deltas(ref_state), _deltas(our_state)
    assert ref_d, "the adapter has no LoRA factors"
    for key in ref_d:
        torch.testing.assert_close(our_d[key], ref_d[key], rtol=1e-4, atol=1e-5, msg=key)
    ref_cfg, our_cfg = ref.peft_config[adapter], ours.peft_config[adapter]
    assert (our_cfg.r, our_cfg.lora_alpha) == (ref_cfg.r, ref_cfg.lora_alpha)
    assert our_cfg.target_modules == ref_cfg.target_modules
    assert our_cfg.rank_pattern == ref_cfg.rank_pattern == {} and our_cfg.alpha_pattern == {}


def _check_outputs(ref, ours, adapter: str, inputs: torch.Tensor) -> None:
    ref.set_adapter(adapter)
    ours.set_adapter(adapter)
    with torch.no_grad():
        torch.testing.assert_close(logits(ours(inputs)), logits(ref(inputs)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("combination_type", ALL_TYPES)
def test_every_combination_type_matches_peft(combination_type):
    ref, ours = _mlp_pair()
    kwargs = dict(adapters=["a", "b"], weights=[0.7, -0.4], adapter_name="mix", combination_type=combination_type)
    if combination_type not in ("svd", "linear", "cat"):
        kwargs["density"] = 0.6
    _both(ref, ours, **kwargs)
    # the svd kinds factor again: equal products, factors up to the SVD's signs
    _check_same_adapter(ref, ours, "mix", exact_factors=combination_type not in SVD_TYPES)
    assert ours.active_adapters == ["a"]  # added frozen and inactive, as in PEFT
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".mix" in n)
    _check_outputs(ref, ours, "mix", input_ids(seed=3))


@pytest.mark.parametrize("combination_type", ["ties", "dare_ties", "ties_svd", "dare_ties_svd"])
def test_majority_sign_frequency(combination_type):
    ref, ours = _mlp_pair()
    _both(ref, ours, adapters=["a", "b"], weights=[1.0, 0.5], adapter_name="mix", combination_type=combination_type,
          density=0.5, majority_sign_method="frequency")
    _check_same_adapter(ref, ours, "mix", exact_factors=combination_type not in SVD_TYPES)


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties_svd", "magnitude_prune_svd", "ties", "cat"])
def test_fan_in_fan_out_conv1d(combination_type):
    targets = dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    ref, ours = _pair(gpt2, {"a": dict(r=4, lora_alpha=8, **targets), "b": dict(r=4, lora_alpha=2, **targets)})
    kwargs = dict(adapters=["b", "a"], weights=[0.3, 1.2], adapter_name="mix", combination_type=combination_type)
    if combination_type != "cat":
        kwargs["density"] = 0.4
    _both(ref, ours, **kwargs)
    _check_same_adapter(ref, ours, "mix", exact_factors=combination_type not in SVD_TYPES)
    _check_outputs(ref, ours, "mix", input_ids(seed=4))


def test_svd_options_and_mixed_ranks():
    ref, ours = _pair(llama, {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                              "b": dict(r=8, lora_alpha=8, target_modules=["v_proj", "o_proj"],
                                        rank_pattern={"o_proj": 6})})
    _both(ref, ours, adapters=["a", "b"], weights=[1.0, 1.0], adapter_name="svd3", combination_type="svd",
          svd_rank=3, svd_clamp=0.9, svd_full_matrices=False)
    _check_same_adapter(ref, ours, "svd3", exact_factors=False)
    _both(ref, ours, adapters=["a", "b"], weights=[0.5, 2.0], adapter_name="cat", combination_type="cat")
    _check_same_adapter(ref, ours, "cat", exact_factors=True)
    assert ours.peft_config["cat"].r == 12  # 4 + max(8, 6)
    _check_outputs(ref, ours, "cat", input_ids(seed=5))
    _both(ref, ours, adapters=["a", "b"], weights=[0.5, 2.0], adapter_name="default_rank",
          combination_type="dare_linear_svd", density=0.7)
    assert ours.peft_config["default_rank"].r == 8
    _check_same_adapter(ref, ours, "default_rank", exact_factors=False)


def test_regex_targets_join_and_one_adapter_is_linear():
    ref, ours = _pair(llama, {"a": dict(r=4, lora_alpha=8, target_modules=r".*\.q_proj"),
                              "b": dict(r=4, lora_alpha=4, target_modules=r".*\.k_proj")})
    _both(ref, ours, adapters=["a", "b"], weights=[1.0, 1.0], adapter_name="mix", combination_type="linear")
    assert ours.peft_config["mix"].target_modules == r"(.*\.q_proj)|(.*\.k_proj)"
    _check_same_adapter(ref, ours, "mix", exact_factors=True)
    # one adapter: PEFT combines it linearly whatever the kind (no density needed)
    _both(ref, ours, adapters=["b"], weights=[2.0], adapter_name="solo", combination_type="dare_ties")
    _check_same_adapter(ref, ours, "solo", exact_factors=True)


def test_density_one_warns_and_keeps_everything():
    ref, ours = _mlp_pair()
    with pytest.warns(UserWarning, match="no pruning will be performed"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="ties", density=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="ties", density=1.0)
    _check_same_adapter(ref, ours, "mix", exact_factors=True)


def test_saved_combination_loads_in_peft(tmp_path):
    ref, ours = _mlp_pair()
    _both(ref, ours, adapters=["a", "b"], weights=[0.6, 0.6], adapter_name="mix", combination_type="dare_ties_svd",
          density=0.5)
    ours.save_pretrained(str(tmp_path), selected_adapters=["mix"])
    folder = os.path.join(str(tmp_path), "mix")
    with open(os.path.join(folder, "adapter_config.json")) as f:
        saved = json.load(f)
    assert saved["r"] == 2 and saved["lora_alpha"] == 2 and sorted(saved["target_modules"]) == sorted(MLP_TARGETS)
    loaded = peft.PeftModel.from_pretrained(plain_mlp(), folder)
    ours.set_adapter("mix")
    ids = input_ids(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ours(ids), **TOL)


def test_existing_name_warns_and_changes_nothing():
    _, ours = _mlp_pair()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.warns(UserWarning, match="already exists"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "b", combination_type="linear")
    after = ours.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _errors(ref, ours, **kwargs):
    """The exceptions PEFT and torchlora raise for the same call."""
    caught = []
    for model in (ref, ours):
        with pytest.raises(Exception) as info:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.add_weighted_adapter(**kwargs)
        caught.append(info.value)
    return caught


@pytest.mark.parametrize("case, error, match", [
    (dict(adapters=["a", "zz"], combination_type="svd"), ValueError, "Adapter zz does not exist"),
    (dict(combination_type="linear"), ValueError, "same r value"),
    (dict(combination_type="ties"), ValueError, "same r value"),
    (dict(combination_type="unknown"), ValueError, "Invalid combination_type"),
])
def test_errors_match_peft_mixed_ranks(case, error, match):
    ref, ours = _mlp_pair(r_b=3)
    kwargs = dict(adapters=["a", "b"], weights=[1.0, 1.0], adapter_name="mix")
    kwargs.update(case)
    theirs, mine = _errors(ref, ours, **kwargs)
    assert isinstance(theirs, error) and isinstance(mine, error)
    assert match in str(theirs) and match in str(mine)
    assert "mix" not in ours.peft_config
    assert not any(".mix" in n for n, _ in ours.named_parameters())


def test_errors_match_peft_target_kinds():
    ref, ours = _pair(llama, {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj"]),
                              "b": dict(r=4, lora_alpha=8, target_modules=r".*\.v_proj")})
    theirs, mine = _errors(ref, ours, adapters=["a", "b"], weights=[1.0, 1.0], adapter_name="mix",
                           combination_type="linear")
    assert type(theirs) is type(mine) is ValueError
    assert "same target modules type" in str(theirs) and "same target modules type" in str(mine)


@pytest.mark.parametrize("combination_type", ["ties", "dare_linear", "magnitude_prune_svd"])
def test_missing_density_is_a_type_error_as_in_peft(combination_type):
    ref, ours = _mlp_pair()
    theirs, mine = _errors(ref, ours, adapters=["a", "b"], weights=[1.0, 1.0], adapter_name="mix",
                           combination_type=combination_type)
    assert isinstance(theirs, TypeError) and isinstance(mine, TypeError)
    assert "density" in str(mine)
    # PEFT fails half-way and keeps a half-made adapter; torchlora leaves nothing behind
    assert "mix" not in ours.peft_config


def test_negative_density_and_bad_options():
    ref, ours = _mlp_pair()
    theirs, mine = _errors(ref, ours, adapters=["a", "b"], weights=[1.0, 1.0], adapter_name="mix",
                           combination_type="dare_ties", density=-0.5)
    assert isinstance(theirs, ValueError) and isinstance(mine, ValueError)
    assert "Density should be >= 0, got -0.5" in str(theirs) and "Density should be >= 0, got -0.5" in str(mine)
    with pytest.raises(ValueError, match="majority_sign_method"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="ties", density=0.5,
                                  majority_sign_method="median")
    with pytest.raises(ValueError, match="svd_clamp"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", svd_clamp=1.5)
    with pytest.raises(ValueError, match="svd_rank"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", svd_rank=0)
    with pytest.raises(ValueError, match="svd_rank 5 is above"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", svd_rank=5)  # the conv delta is [2, 9]
    with pytest.raises(ValueError, match="one weight per adapter"):
        ours.add_weighted_adapter(["a", "b"], [1.0], "mix", combination_type="cat")
    with pytest.raises(TypeError, match="weights"):
        ours.add_weighted_adapter(["a", "b"], [1.0, "x"], "mix", combination_type="cat")
    with pytest.raises(TypeError, match="adapters"):
        ours.add_weighted_adapter("a", [1.0], "mix", combination_type="cat")
    assert "mix" not in ours.peft_config
    assert not any(".mix" in n for n, _ in ours.named_parameters())


def test_modules_to_save_conflict_matches_peft():
    cfg = dict(r=2, lora_alpha=4, target_modules=["lin0"], modules_to_save=["head"])
    ref, ours = _pair(plain_mlp, {"a": cfg, "b": cfg})
    theirs, mine = _errors(ref, ours, adapters=["a", "b"], weights=[1.0, 1.0], adapter_name="mix",
                           combination_type="linear")
    assert type(theirs) is type(mine) is ValueError
    assert "modules_to_save" in str(theirs) and "modules_to_save" in str(mine)


def test_core_merges_match_peft_merge_utils():
    from peft.utils import merge_utils

    torch.manual_seed(0)
    tasks = [torch.randn(5, 7) for _ in range(3)]
    weights = torch.tensor([0.5, -1.0, 2.0])
    # through the combination of three rank-5 "adapters" whose lora_B is the identity
    eye = torch.eye(5)
    plan, _ = torchlora._C.peft.weighted_adapter_plan(
        [json.dumps(torchlora.LoraConfig(r=5, lora_alpha=5, target_modules=["x"]).to_json_dict())] * 3,
        ["t0", "t1", "t2"], "ties", None, None, True, None, 0.4, "frequency")
    a, b = torchlora._C.peft.combine_lora_factors([(t, eye, 1.0, float(w)) for t, w in zip(tasks, weights)], plan)
    # linear kinds weight A by sqrt(|w|) * sign(w), B by sqrt(|w|): the B's merge to sqrt-weighted identities
    wa = weights.sign() * weights.abs().sqrt()
    torch.testing.assert_close(a, merge_utils.ties(tasks, wa, 0.4, "frequency"))
    torch.testing.assert_close(b, merge_utils.ties([eye] * 3, weights.abs().sqrt(), 0.4, "frequency"))
