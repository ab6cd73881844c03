"""The model card (``README.md``) written beside a saved adapter, with the metadata PEFT puts
there, so that the Hub lists the adapter as a PEFT adapter of its base model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .peft_model import PeftModel

CARD_NAME = "README.md"
_VERSIONS_HEADING = "### Framework versions"


def _model_tags(model: "PeftModel") -> set[str]:
    base = model.get_base_model()
    tags = set(getattr(base, "model_tags", None) or [])
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        PreTrainedModel = ()  # type: ignore[assignment]
    if PreTrainedModel and isinstance(base, PreTrainedModel):
        tags.add("transformers")
    tags.add("lora")
    name_or_path = getattr(model.base_model, "name_or_path", None)
    if name_or_path is not None:
        tags.add(f"base_model:adapter:{name_or_path}")
    return tags


def update_model_card(model: "PeftModel", output_dir: str) -> None:
    """Create or update ``<output_dir>/README.md``: ``library_name: peft``, the tags (the base
    model's, ``transformers``, ``lora``, ``base_model:adapter:<name>``), ``base_model`` from the
    model config's ``_name_or_path``, ``pipeline_tag: text-generation`` for causal LMs when
    unset, and torchlora's version under "Framework versions" (added once)."""
    from huggingface_hub import ModelCard, ModelCardData

    from ._native import build_info
    from .peft_model import PeftModelForCausalLM
    from .tuners.lora_model import model_config_dict

    if os.path.isfile(output_dir):
        raise ValueError(f"output_dir {output_dir!r} is a file, expected a folder")
    os.makedirs(output_dir, exist_ok=True)
    filename = os.path.join(output_dir, CARD_NAME)
    card = ModelCard.load(filename) if os.path.exists(filename) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    card.data["tags"] = sorted(_model_tags(model))
    if not card.data.pipeline_tag and isinstance(model, PeftModelForCausalLM):
        card.data.pipeline_tag = "text-generation"
    config = model_config_dict(model.get_base_model())
    if "_name_or_path" in config:
        card.data["base_model"] = config["_name_or_path"]

    lines = card.text.splitlines()
    version_line = f"- torchlora {build_info()['version']}"
    if version_line not in lines:
        if _VERSIONS_HEADING in lines:
            lines.insert(lines.index(_VERSIONS_HEADING) + 2, version_line)
        else:
            lines.append(f"{_VERSIONS_HEADING}\n\n{version_line}")
    card.text = "\n".join(lines)
    card.save(filename)
