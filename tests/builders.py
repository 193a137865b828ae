"""Tiny models built from configs (no downloads), imported by name by the tests (``from builders import
tiny_llama``): a helper module rather than conftest.py, which a sub-directory's own conftest.py would shadow."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.testing import CHATML, char_tokenizer, write_tiny_model  # noqa: F401  (tests import them from here)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                         **overrides})
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**{"vocab_size": 80, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 3,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                         "tie_word_embeddings": True, **overrides})
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


class TTSBlock(nn.Module):
    """A block shaped like the seeds' TTS decoders: fused wqkv, wo, and a SwiGLU w1/w2/w3."""

    def __init__(self, dim: int = 24, hidden: int = 40):
        super().__init__()
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        q, k, v = self.wqkv(self.norm(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.wo(att @ v)
        return x + self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class TinyTTS(nn.Module):
    """A plain PyTorch model (not transformers): embedding, blocks, codebook head."""

    def __init__(self, vocab: int = 50, dim: int = 24, n_layers: int = 2):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(TTSBlock(dim) for _ in range(n_layers))
        self.output = nn.Linear(dim, vocab, bias=True)

    def forward(self, ids):
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x)
        return self.output(x)


def tiny_tts(seed: int = 0) -> TinyTTS:
    torch.manual_seed(seed)
    return TinyTTS().eval()
