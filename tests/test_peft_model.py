"""PeftModel lifecycle against PEFT: merging, unloading, disabling, several adapters, mixed
batches, state dicts, PiSSA/OLoRA init, dtype/train/eval, checkpointing, torch.compile, Trainer."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import tiny_models as tm
import torchlora
from peft_parity import build_pair, copy_adapter, grads, logits, sync_all_weights, trainable
from torchlora.nn import LoraLayer
from torchlora.tuners import ModulesToSaveWrapper

IDS = tm.input_ids()


def _cfg(**kwargs):
    return lambda lib: lib.LoraConfig(init_lora_weights=False, **kwargs)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _no_lora_left(model):
    return not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in model.modules())


MERGE_CASES = [
    ("llama", tm.llama, dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]), {"input_ids": IDS}),
    ("llama-lora-bias", lambda: tm.llama(attention_bias=True), dict(r=4, target_modules=["o_proj"], lora_bias=True),
     {"input_ids": IDS}),
    ("gpt2-conv1d", tm.gpt2, dict(r=4, target_modules=["c_attn", "c_fc"]), {"input_ids": IDS}),
    ("bert-seq-cls", tm.bert_seq_cls, dict(r=4, task_type="SEQ_CLS"), {"input_ids": IDS}),
    ("resnet", tm.resnet, dict(r=4, target_modules=["convolution"]), {"pixel_values": tm.pixel_values()}),
]


@pytest.mark.parametrize("builder,kwargs,inputs", [c[1:] for c in MERGE_CASES], ids=[c[0] for c in MERGE_CASES])
def test_merge_unmerge_and_unload_match_peft(builder, kwargs, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, ours = build_pair(builder, _cfg(**kwargs))
        sync_all_weights(ref, ours)
        with torch.no_grad():
            base = logits(builder()(**inputs))
            adapted = logits(ours(**inputs))
            _close(adapted, logits(ref(**inputs)))
            ours.merge_adapter()
            ref.merge_adapter()
            _close(logits(ours(**inputs)), adapted, 1e-4)
            _close(ours.state_dict()[next(k for k in ours.state_dict() if "base_layer.weight" in k)],
                   ref.state_dict()[next(k for k in ref.state_dict() if "base_layer.weight" in k)])
            ours.unmerge_adapter()
            _close(logits(ours(**inputs)), adapted, 1e-4)
            with ours.disable_adapter():
                _close(logits(ours(**inputs)), base, 1e-5)
            merged_ours = ours.merge_and_unload(safe_merge=True)
            merged_ref = ref.merge_and_unload()
            assert _no_lora_left(merged_ours)
            assert type(merged_ours) is type(merged_ref)
            assert set(merged_ours.state_dict()) == set(merged_ref.state_dict())
            _close(logits(merged_ours(**inputs)), logits(merged_ref(**inputs)), 1e-4)
            _close(logits(merged_ours(**inputs)), adapted, 1e-4)


def test_unload_returns_the_bare_model():
    ref, ours = build_pair(tm.llama, _cfg(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    base = logits(tm.llama()(IDS))
    bare = ours.unload()
    assert _no_lora_left(bare)
    assert set(bare.state_dict()) == set(tm.llama().state_dict())
    _close(logits(bare(IDS)), base)


def test_merge_and_unload_selected_adapters_and_progressbar(capsys):
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    ours.add_adapter("b", torchlora.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    ref = peft.get_peft_model(tm.llama(), peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    ref.add_adapter("b", peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    for name in ("default", "b"):
        copy_adapter(ref, ours, name)
    merged_ours = ours.merge_and_unload(progressbar=True, adapter_names=["default", "b"])
    merged_ref = ref.merge_and_unload(adapter_names=["default", "b"])
    _close(logits(merged_ours(IDS)), logits(merged_ref(IDS)), 1e-4)


def test_safe_merge_refuses_non_finite_weights():
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


def test_disable_adapter_and_adapter_layers_match_peft():
    ref, ours = build_pair(tm.llama, _cfg(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    sync_all_weights(ref, ours)
    adapted = logits(ours(IDS))
    with ours.disable_adapter(), ref.disable_adapter():
        _close(logits(ours(IDS)), logits(ref(IDS)))
        assert trainable(ours) == trainable(ref)
        assert not torch.allclose(logits(ours(IDS)), adapted)
    assert trainable(ours) == trainable(ref)
    _close(logits(ours(IDS)), adapted)
    ours.disable_adapter_layers()
    ref.base_model.disable_adapter_layers()
    _close(logits(ours(IDS)), logits(ref(IDS)))
    ours.enable_adapter_layers()
    _close(logits(ours(IDS)), adapted)


def test_disable_adapter_restores_after_an_exception():
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    adapted = logits(ours(IDS))
    with pytest.raises(RuntimeError):
        with ours.disable_adapter():
            raise RuntimeError("boom")
    _close(logits(ours(IDS)), adapted)


# ---------------------------------------------------------------------- several adapters
def _two_adapter_pair():
    kwargs_a = dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    kwargs_b = dict(r=2, lora_alpha=4, target_modules=["k_proj", "v_proj"], modules_to_save=["lm_head"],
                    init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(tm.llama(), peft.LoraConfig(**kwargs_a))
        ref.add_adapter("other", peft.LoraConfig(**kwargs_b))
        ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(**kwargs_a))
        ours.add_adapter("other", torchlora.LoraConfig(**kwargs_b))
    sync_all_weights(ref, ours)
    return ref.eval(), ours.eval()


def test_add_adapter_is_inactive_and_frozen_like_peft():
    ref, ours = _two_adapter_pair()
    assert ours.active_adapter == ref.active_adapter == "default"
    assert ours.active_adapters == ref.active_adapters == ["default"]
    assert trainable(ours) == trainable(ref)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    _close(logits(ours(IDS)), logits(ref(IDS)))


def test_set_adapter_switches_like_peft():
    ref, ours = _two_adapter_pair()
    out_default = logits(ours(IDS))
    ours.set_adapter("other")
    ref.set_adapter("other")
    assert ours.active_adapter == "other"
    assert trainable(ours) == trainable(ref)
    out_other = logits(ours(IDS))
    _close(out_other, logits(ref(IDS)))
    assert not torch.allclose(out_other, out_default)
    ours.set_adapter("default")
    _close(logits(ours(IDS)), out_default)
    with pytest.raises(ValueError, match="not found"):
        ours.set_adapter("missing")


def test_delete_adapter_like_peft():
    kwargs = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    ref = peft.get_peft_model(tm.llama(), peft.LoraConfig(**kwargs))
    ref.add_adapter("other", peft.LoraConfig(**kwargs))
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(**kwargs))
    ours.add_adapter("other", torchlora.LoraConfig(**kwargs))
    sync_all_weights(ref, ours)
    ours.delete_adapter("default")
    ref.delete_adapter("default")
    assert ours.active_adapter == ref.active_adapter == "other"
    assert list(ours.peft_config) == ["other"]
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert trainable(ours) == trainable(ref)
    _close(logits(ours(IDS)), logits(ref(IDS)))
    with pytest.raises(ValueError, match="does not exist"):
        ours.delete_adapter("default")


def test_delete_active_adapter_activates_the_next_one_everywhere():
    # PEFT takes the new active adapter from the first LoRA layer it meets; when that layer lacks
    # the other adapter, PEFT ends with no active adapter. torchlora takes the next adapter in
    # peft_config order on every layer.
    _, ours = _two_adapter_pair()
    ours.delete_adapter("default")
    assert ours.active_adapter == "other" and ours.active_adapters == ["other"]
    layers = [m for m in ours.modules() if isinstance(m, LoraLayer) and "other" in m.adapter_names()]
    assert layers and all(m.active_adapters == ["other"] for m in layers)


def test_add_adapter_errors_roll_back():
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        ours.add_adapter("default", torchlora.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not found in the base model"):
        ours.add_adapter("x", torchlora.LoraConfig(target_modules=["nope"]))
    assert list(ours.peft_config) == ["default"]
    with pytest.raises(TypeError, match="LoraConfig"):
        ours.add_adapter("y", peft.LoraConfig(target_modules=["q_proj"]))


def test_mixed_batch_matches_peft():
    ref, ours = _two_adapter_pair()
    ids = tm.input_ids(batch=4)
    names = ["default", "other", "__base__", "other"]
    _close(logits(ours(input_ids=ids, adapter_names=names)), logits(ref(input_ids=ids, adapter_names=names)))
    with pytest.raises(ValueError, match="non-existing adapter"):
        ours(input_ids=ids, adapter_names=["default", "nope", "other", "other"])
    # PEFT refuses mixed batches in training mode; torchlora trains them (tests/test_mixed_batch_training.py)
    ours.train()
    assert logits(ours(input_ids=ids, adapter_names=names)).requires_grad


@pytest.mark.parametrize("num_beams", [1, 2])
def test_mixed_batch_generate(num_beams):
    ref, ours = _two_adapter_pair()
    ids = tm.input_ids(batch=3, length=4)
    kwargs = dict(max_new_tokens=3, do_sample=False, num_beams=num_beams,
                  adapter_names=["other", "__base__", "default"])
    assert torch.equal(ours.generate(input_ids=ids, **kwargs), ref.generate(input_ids=ids, **kwargs))


def test_mixed_batch_beam_search_encoder_decoder():
    kwargs = dict(target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM", init_lora_weights=False)
    ref = peft.get_peft_model(tm.t5(), peft.LoraConfig(**kwargs))
    ref.add_adapter("other", peft.LoraConfig(**kwargs))
    ours = torchlora.get_peft_model(tm.t5(), torchlora.LoraConfig(**kwargs))
    ours.add_adapter("other", torchlora.LoraConfig(**kwargs))
    sync_all_weights(ref, ours)
    ref.eval(), ours.eval()
    gen = dict(max_new_tokens=3, num_beams=2, do_sample=False, adapter_names=["other", "__base__", "default"])
    ids = tm.input_ids(batch=3, length=4)
    assert torch.equal(ours.generate(input_ids=ids, **gen), ref.generate(input_ids=ids, **gen))


def test_seq2seq_generate_matches_peft():
    ref, ours = build_pair(tm.t5, _cfg(r=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    kwargs = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(ours.generate(input_ids=IDS, **kwargs), ref.generate(input_ids=IDS, **kwargs))


# ---------------------------------------------------------------------- state dicts
def test_state_dict_keys_and_values_match_peft():
    ref, ours = _two_adapter_pair()
    for name in ("default", "other"):
        theirs = peft.get_peft_model_state_dict(ref, adapter_name=name)
        mine = torchlora.get_peft_model_state_dict(ours, adapter_name=name)
        assert set(mine) == set(theirs)
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), key
        assert all(f".{name}." not in k for k in mine)


def test_state_dict_round_trip_into_another_adapter_name():
    ref, ours = _two_adapter_pair()
    state = torchlora.get_peft_model_state_dict(ours, adapter_name="default")
    fresh = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]), adapter_name="renamed")
    result = torchlora.set_peft_model_state_dict(fresh, state, adapter_name="renamed")
    assert result.missing_keys == [] and result.unexpected_keys == []
    _close(logits(fresh(IDS)), logits(ours(IDS)))


def test_set_state_dict_raises_on_unknown_key():
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"]))
    state = torchlora.get_peft_model_state_dict(ours)
    state["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(8, 32)
    with pytest.raises(ValueError, match=r"k_proj\.lora_A\.weight"):
        torchlora.set_peft_model_state_dict(ours, state)


def test_set_state_dict_raises_on_shape_mismatch():
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"]))
    state = torchlora.get_peft_model_state_dict(ours)
    key = next(iter(state))
    state[key] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="has shape"):
        torchlora.set_peft_model_state_dict(ours, state)
    with pytest.warns(UserWarning, match="Skipping"):
        result = torchlora.set_peft_model_state_dict(ours, state, ignore_mismatched_sizes=True)
    assert len(result.missing_keys) == 1


def test_set_state_dict_reports_missing_keys_and_unknown_adapter():
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"]))
    state = torchlora.get_peft_model_state_dict(ours)
    dropped = sorted(state)[0]
    del state[dropped]
    result = torchlora.set_peft_model_state_dict(ours, state)
    assert len(result.missing_keys) == 1
    with pytest.raises(ValueError, match="does not exist"):
        torchlora.set_peft_model_state_dict(ours, state, adapter_name="nope")


def test_bias_state_dicts_match_peft():
    for bias, targets in (("all", ["q_proj"]), ("lora_only", ["c_attn"])):
        builder = tm.llama if bias == "all" else tm.gpt2
        ref, ours = build_pair(builder, _cfg(r=4, target_modules=targets, bias=bias))
        assert set(torchlora.get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(ref))


# ---------------------------------------------------------------------- PiSSA / OLoRA
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
@pytest.mark.parametrize("builder,targets", [(tm.llama, ["q_proj", "v_proj", "down_proj"]), (tm.gpt2, ["c_attn"])],
                         ids=["llama", "gpt2-conv1d"])
def test_svd_qr_inits_match_peft(init, builder, targets):
    if init == "olora" and builder is tm.gpt2:
        pytest.skip("PEFT's OLoRA ignores fan_in_fan_out (wrong shapes on Conv1D); torchlora handles it")
    models = [builder(), builder()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(123)
        ref = peft.get_peft_model(models[0], peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             init_lora_weights=init))
        torch.manual_seed(123)
        ours = torchlora.get_peft_model(models[1], torchlora.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                        init_lora_weights=init))
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert set(ref_state) == set(our_state)
    for key in ref_state:
        torch.testing.assert_close(our_state[key], ref_state[key], rtol=1e-4, atol=1e-5, msg=key)
    # the residual + adapter reproduces the original model
    _close(logits(ours(IDS)), logits(builder()(IDS)), 1e-4)


def test_olora_on_conv1d_keeps_the_output():
    ours = torchlora.get_peft_model(tm.gpt2(), torchlora.LoraConfig(r=4, target_modules=["c_attn"],
                                                                    init_lora_weights="olora"))
    _close(logits(ours(IDS)), logits(tm.gpt2()(IDS)), 1e-4)


# ---------------------------------------------------------------------- modes, dtypes, compile, training
def test_train_eval_and_dropout():
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                                     lora_dropout=0.5, init_lora_weights=False))
    ours.eval()
    first = logits(ours(IDS))
    _close(logits(ours(IDS)), first)
    ours.train()
    assert all(m.training for m in ours.modules())
    assert not torch.allclose(logits(ours(IDS)), first)
    ours.eval()
    assert not any(m.training for m in ours.modules())


def test_to_bfloat16_and_autocast_adapter_dtype():
    model = tm.llama().to(torch.bfloat16)
    ours = torchlora.get_peft_model(model, torchlora.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    ref = peft.get_peft_model(tm.llama().to(torch.bfloat16),
                              peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    ours_dtypes = {n: p.dtype for n, p in ours.named_parameters()}
    assert ours_dtypes == {n: p.dtype for n, p in ref.named_parameters()}
    assert ours_dtypes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == torch.float32
    sync_all_weights(ref, ours)
    out = logits(ours(IDS))
    assert out.dtype == torch.bfloat16
    _close(out.float(), logits(ref(IDS)).float(), 2e-2)
    ours.to(torch.float32)
    assert logits(ours(IDS)).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_cuda_matches_cpu():
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    cpu = logits(ours(IDS))
    ours.to("cuda")
    _close(logits(ours(IDS.cuda())).cpu(), cpu, 1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    results = []
    for checkpointing in (False, True):
        model = tm.llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        ours = torchlora.get_peft_model(model, torchlora.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                                    init_lora_weights=False))
        ours.train()
        torch.manual_seed(0)
        ours(input_ids=IDS, labels=IDS).loss.backward()
        results.append(grads(ours))
    assert set(results[0]) == set(results[1]) and results[0]
    for name in results[0]:
        _close(results[1][name], results[0][name], 1e-5)


def test_torch_compile_matches_eager():
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(
        target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False))
    eager = logits(ours(IDS))
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    _close(logits(compiled(IDS)), eager)
    loss = logits(compiled(IDS)).pow(2).mean()
    loss.backward()
    assert grads(ours)


def test_trainer_steps_update_only_the_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                                     task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    ids = tm.input_ids(batch=8, length=6)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    Trainer(model=ours, args=args, train_dataset=dataset).train()
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_model_attributes():
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(target_modules=["q_proj"]))
    assert isinstance(ours.base_model, torchlora.LoraModel)
    assert ours.get_base_model() is ours.base_model.model
    assert isinstance(ours.peft_config["default"], torchlora.LoraConfig)
    assert ours.active_peft_config is ours.peft_config["default"]
    assert ours.config.model_type == "llama"  # attribute lookup falls through to the model
    assert ours.peft_config["default"].base_model_name_or_path is None


def test_seq_cls_head_is_saved_whole():
    ref, ours = build_pair(tm.bert_seq_cls, _cfg(r=4, task_type="SEQ_CLS"))
    wrapper = ours.base_model.model.classifier
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert wrapper.weight is wrapper.modules_to_save["default"].weight
    assert ours.peft_config["default"].modules_to_save == ref.peft_config["default"].modules_to_save
    assert "base_model.model.classifier.weight" in torchlora.get_peft_model_state_dict(ours)


def test_inference_mode_config_freezes_everything_like_peft():
    ref, ours = build_pair(tm.llama, _cfg(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                          inference_mode=True))
    assert trainable(ours) == trainable(ref)
    assert ours.get_nb_trainable_parameters()[0] == 0


def test_set_adapter_inference_mode_freezes_the_adapter():
    ref, ours = _two_adapter_pair()
    ours.set_adapter("other", inference_mode=True)
    ref.set_adapter("other", inference_mode=True)
    assert trainable(ours) == trainable(ref)
    assert ours.get_nb_trainable_parameters()[0] == 0


def test_base_model_set_adapter_with_several_adapters():
    kwargs = dict(target_modules=["q_proj"], init_lora_weights=False)
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(**kwargs))
    ours.add_adapter("b", torchlora.LoraConfig(**kwargs))
    ref = peft.get_peft_model(tm.llama(), peft.LoraConfig(**kwargs))
    ref.add_adapter("b", peft.LoraConfig(**kwargs))
    sync_all_weights(ref, ours)
    ours.base_model.set_adapter(["default", "b"])
    ref.base_model.set_adapter(["default", "b"])
    assert ours.active_adapters == ref.active_adapters == ["default", "b"]
    assert trainable(ours) == trainable(ref)
    _close(logits(ours(IDS)), logits(ref(IDS)))
    ours.merge_adapter()
    ref.merge_adapter()
    _close(logits(ours(IDS)), logits(ref(IDS)), 1e-4)


def test_peft_loads_our_state_dict():
    kwargs = dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"],
                  init_lora_weights=False)
    ours = torchlora.get_peft_model(tm.llama(), torchlora.LoraConfig(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(tm.llama(), peft.LoraConfig(**kwargs))
        result = peft.set_peft_model_state_dict(ref, torchlora.get_peft_model_state_dict(ours))
    assert not result.unexpected_keys
    _close(logits(ref(IDS)), logits(ours(IDS)))
