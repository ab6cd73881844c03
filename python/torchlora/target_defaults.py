"""Default ``target_modules`` per transformers ``model_type``, used when a LoraConfig leaves
``target_modules=None`` (the same choices PEFT makes: the attention query/value projections)."""

from __future__ import annotations

from typing import Optional, Union

_QV_PROJ = ("q_proj", "v_proj")
_QUERY_VALUE = ("query", "value")
_FUSED_QKV = ("query_key_value",)

DEFAULT_TARGET_MODULES: dict[str, Union[tuple[str, ...], str]] = {
    # encoder-decoder
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": _QV_PROJ,
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    # encoders
    "bert": _QUERY_VALUE,
    "roberta": _QUERY_VALUE,
    "xlm-roberta": _QUERY_VALUE,
    "electra": _QUERY_VALUE,
    "layoutlm": _QUERY_VALUE,
    "deberta": ("in_proj",),
    "deberta-v2": ("query_proj", "value_proj"),
    # decoders with separate q/v projections
    "llama": _QV_PROJ,
    "llama4": _QV_PROJ,
    "mistral": _QV_PROJ,
    "mixtral": _QV_PROJ,
    "qwen2": _QV_PROJ,
    "qwen3": _QV_PROJ,
    "gemma": _QV_PROJ,
    "gemma2": _QV_PROJ,
    "gemma3_text": _QV_PROJ,
    "opt": _QV_PROJ,
    "gptj": _QV_PROJ,
    "gpt_neo": _QV_PROJ,
    "stablelm": _QV_PROJ,
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    # decoders with a fused qkv projection
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "btlm": ("c_proj", "c_attn"),
    "bloom": _FUSED_QKV,
    "gpt_neox": _FUSED_QKV,
    "falcon": _FUSED_QKV,
    "RefinedWeb": _FUSED_QKV,
    "RefinedWebModel": _FUSED_QKV,
    "chatglm": _FUSED_QKV,
    "codegen": ("qkv_proj",),
    "mpt": ("Wqkv",),
    # multimodal: only the language model's projections
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    # recurrent
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}


def default_target_modules(model_type: Optional[str]) -> Union[set[str], str, None]:
    """The default targets for ``model_type`` (a set of names or a regex), or None if unknown."""
    if model_type is None:
        return None
    targets = DEFAULT_TARGET_MODULES.get(model_type)
    if targets is None or isinstance(targets, str):
        return targets
    return set(targets)
