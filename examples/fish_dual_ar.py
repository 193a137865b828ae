"""A Fish-Speech-style dual autoregressive transformer, as a plain PyTorch module lorakit can adapt.

The shape follows fishaudio/fish-speech ``fish_speech/models/text2semantic/llama.py``
(``DualARTransformer``): a slow transformer runs over a token grid (row 0: text/semantic tokens; rows
1..C: the codec's C codebooks, summed into the embedding at semantic positions) and predicts the next
token; at every semantic position a fast transformer runs over the codebooks and predicts them one by
one. Attention uses one fused ``wqkv`` projection, the MLP is SwiGLU ``w1/w2/w3``. Module and key names
are fish-speech's (``layers.N.attention.wqkv.weight``, ``codebook_embeddings.weight``,
``fast_layers.N.feed_forward.w2.weight``, ...), so its ``model.pth`` loads with ``--weights`` (a
Lightning checkpoint's ``state_dict`` with ``model.`` prefixes too).

Interface:

    DualAR(cfg: DualARConfig)
    model(inp, labels, key_padding_mask=None) -> (token_logits (B, T, vocab), codebook_logits (N, C, codebook_size))
        inp, labels: (B, 1 + C, T) token grids; labels are the next-step targets (-100 ignored), N the
        number of semantic positions in labels[:, 0]; key_padding_mask (B, T), True on padding.
    build_tiny(seed=0), build(config=None, device=None), build_full(device="meta")  # openaudio-s1-mini shapes
    build_tiny_tied(seed=0)  # the token head reads embeddings.weight (tie_word_embeddings=True)
    loss(model, batch) -> {"loss", "token_loss", "codebook_loss"}
    random_batch(model), example_inputs(model)  # a batch; forward keyword arguments for export native's check

Batch columns (2-D rows, codebooks x time, padded on the time axis): ``input_ids`` (B, 1 + C, T),
``labels`` (B, 1 + C, T) padded with -100, and optionally ``attention_mask`` (B, T), 1 on real steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DualARConfig:
    """fish-speech's DualARModelArgs (the fields this model uses); fast_* default to the slow values."""

    vocab_size: int = 155776
    n_layer: int = 28
    n_head: int = 16
    n_local_heads: int = 8
    head_dim: int = 128
    dim: int = 1024
    intermediate_size: int = 3072
    codebook_size: int = 4096
    num_codebooks: int = 10
    n_fast_layer: int = 4
    fast_dim: int | None = None
    fast_n_head: int | None = None
    fast_n_local_heads: int | None = None
    fast_head_dim: int | None = None
    fast_intermediate_size: int | None = None
    attention_qk_norm: bool = True
    fast_attention_qk_norm: bool = False
    tie_word_embeddings: bool = False
    rope_base: float = 1_000_000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 8192
    semantic_begin_id: int = 151678
    semantic_end_id: int = 155773

    def __post_init__(self):
        self.fast_dim = self.fast_dim or self.dim
        self.fast_n_head = self.fast_n_head or self.n_head
        self.fast_n_local_heads = self.fast_n_local_heads or self.n_local_heads
        self.fast_head_dim = self.fast_head_dim or self.head_dim
        self.fast_intermediate_size = self.fast_intermediate_size or self.intermediate_size

    def fast(self) -> DualARConfig:
        """The config of a fast-transformer block (its own width, heads and MLP)."""
        return dataclasses.replace(self, dim=self.fast_dim, n_head=self.fast_n_head, n_local_heads=self.fast_n_local_heads,
                                   head_dim=self.fast_head_dim, intermediate_size=self.fast_intermediate_size,
                                   attention_qk_norm=self.fast_attention_qk_norm)


# openaudio-s1-mini (config.json of fishaudio/openaudio-s1-mini): a Qwen3-0.6B-shaped slow transformer
# (28 layers, width 1024, 16 query / 8 key-value heads of 128, SwiGLU 3072, q/k norms) over a
# 155,776-token vocabulary with an untied output head, 10 codebooks of 4096 codes, 4 fast layers.
S1_MINI_CONFIG: dict = {}  # DualARConfig's defaults are these shapes
TINY_CONFIG = {"vocab_size": 40, "n_layer": 2, "n_head": 4, "n_local_heads": 2, "head_dim": 8, "dim": 32,
               "intermediate_size": 48, "codebook_size": 12, "num_codebooks": 3, "n_fast_layer": 1,
               "fast_dim": 24, "fast_n_head": 2, "fast_n_local_heads": 1, "fast_head_dim": 12,
               "fast_intermediate_size": 40, "max_seq_len": 64, "semantic_begin_id": 28, "semantic_end_id": 39}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding over the sequence axis of x (B, L, H, D), pairs (2i, 2i+1) as fish-speech."""
    L, D = x.shape[1], x.shape[-1]
    freqs = 1.0 / base ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angle = torch.outer(torch.arange(L, device=x.device, dtype=torch.float32), freqs)  # (L, D/2)
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    pairs = x.float().reshape(*x.shape[:-1], D // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: DualARConfig):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = cfg.n_head, cfg.n_local_heads, cfg.head_dim
        self.rope_base = cfg.rope_base
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.n_local_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.dim, bias=False)
        self.qk_norm = cfg.attention_qk_norm
        if self.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, L, self.n_head, self.head_dim)
        k = k.view(B, L, self.n_local_heads, self.head_dim)
        v = v.view(B, L, self.n_local_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, self.rope_base), rotary(k, self.rope_base)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        k = k.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, L, q_size))


class FeedForward(nn.Module):
    def __init__(self, cfg: DualARConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: DualARConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, mask):
        h = x + self.attention(self.attention_norm(x), mask)
        return h + self.feed_forward(self.ffn_norm(h))


class DualAR(nn.Module):
    """Slow transformer over the token grid, fast transformer over the codebooks (module docstring)."""

    def __init__(self, cfg: DualARConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.codebook_embeddings = nn.Embedding(cfg.codebook_size * cfg.num_codebooks, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if not cfg.tie_word_embeddings:
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.fast_project_in = nn.Linear(cfg.dim, cfg.fast_dim) if cfg.fast_dim != cfg.dim else nn.Identity()
        self.fast_embeddings = nn.Embedding(cfg.codebook_size, cfg.fast_dim)
        self.fast_layers = nn.ModuleList(TransformerBlock(cfg.fast()) for _ in range(cfg.n_fast_layer))
        self.fast_norm = RMSNorm(cfg.fast_dim, cfg.norm_eps)
        self.fast_output = nn.Linear(cfg.fast_dim, cfg.codebook_size, bias=False)

    def is_semantic(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.config.semantic_begin_id) & (ids <= self.config.semantic_end_id)

    def embed(self, inp: torch.Tensor) -> torch.Tensor:
        """(B, 1 + C, T) → (B, T, dim): token embedding + the sum of the C codebook embeddings where the
        token is semantic."""
        cfg = self.config
        offsets = torch.arange(cfg.num_codebooks, device=inp.device)[None, :, None] * cfg.codebook_size
        codes = self.codebook_embeddings(inp[:, 1:] + offsets).sum(dim=1)  # (B, T, dim)
        codes = codes * self.is_semantic(inp[:, 0])[..., None]
        return self.embeddings(inp[:, 0]) + codes

    def forward(self, inp: torch.Tensor, labels: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        cfg = self.config
        T = inp.shape[-1]
        mask = torch.ones(T, T, dtype=torch.bool, device=inp.device).tril()[None, None]  # (1, 1, T, T)
        if key_padding_mask is not None:
            mask = mask & ~key_padding_mask[:, None, None, :]
        x = self.embed(inp)
        for layer in self.layers:
            x = layer(x, mask)
        slow_out = self.norm(x)
        if cfg.tie_word_embeddings:  # fish-speech's tie: the head reads the embedding table itself
            token_logits = F.linear(slow_out, self.embeddings.weight)  # (B, T, vocab)
        else:
            token_logits = self.output(slow_out)

        # fast transformer: at each position whose target is semantic, predict its C codes in turn
        semantic = self.is_semantic(labels[:, 0])  # (B, T)
        codes = labels[:, 1:].permute(0, 2, 1)[semantic].clamp(min=0)  # (N, C); -100 rows only feed inputs
        h = self.fast_project_in(x[semantic])  # (N, fast_dim)
        h = torch.cat([h[:, None], self.fast_embeddings(codes[:, :-1])], dim=1)  # (N, C, fast_dim)
        fast_mask = torch.ones(cfg.num_codebooks, cfg.num_codebooks, dtype=torch.bool, device=inp.device).tril()
        for layer in self.fast_layers:
            h = layer(h, fast_mask)
        codebook_logits = self.fast_output(self.fast_norm(h))  # (N, C, codebook_size)
        return token_logits, codebook_logits


def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fish-speech's training loss: token cross-entropy + codebook cross-entropy (each a mean).

    Args:
        model: a DualAR (adapted or not).
        batch: ``input_ids`` (B, 1 + C, T), ``labels`` (B, 1 + C, T) with -100, optional ``attention_mask``.
    """
    labels = batch["labels"]
    mask = batch.get("attention_mask")
    token_logits, codebook_logits = model(batch["input_ids"], labels, None if mask is None else mask == 0)
    token_loss = F.cross_entropy(token_logits.flatten(0, 1).float(), labels[:, 0].flatten(), ignore_index=-100)
    cfg = getattr(model, "module", model).config  # DDP wraps the module; the forward above goes through it
    semantic = (labels[:, 0] >= cfg.semantic_begin_id) & (labels[:, 0] <= cfg.semantic_end_id)
    code_labels = labels[:, 1:].permute(0, 2, 1)[semantic]  # (N, C)
    if code_labels.numel():
        codebook_loss = F.cross_entropy(codebook_logits.flatten(0, 1).float(), code_labels.flatten(), ignore_index=-100)
    else:  # no semantic step in this batch: a zero that still reaches the fast transformer's graph
        codebook_loss = codebook_logits.sum() * 0.0
    return {"loss": token_loss + codebook_loss, "token_loss": token_loss.detach(), "codebook_loss": codebook_loss.detach()}


def build(config: dict | None = None, device: str | torch.device | None = None) -> DualAR:
    """A DualAR with random weights (fish-speech's init: normal(0, 0.02)) from DualARConfig fields
    (default: openaudio-s1-mini).

    Args:
        config: DualARConfig fields; None is S1_MINI_CONFIG.
        device: where to build it ("meta" allocates nothing, for counting).
    """
    cfg = DualARConfig(**(S1_MINI_CONFIG if config is None else config))
    with torch.device(device or "cpu"):
        model = DualAR(cfg)
    if not any(p.is_meta for p in model.parameters()):
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
    return model


def build_full(device: str | torch.device = "meta") -> DualAR:
    """openaudio-s1-mini at full size (on the meta device by default: shapes only)."""
    return build(S1_MINI_CONFIG, device)


def build_tiny(seed: int = 0) -> DualAR:
    """The same architecture at toy size, random weights (seeded), in eval mode: for tests."""
    torch.manual_seed(seed)
    return build(TINY_CONFIG).eval()


def build_tiny_tied(seed: int = 0) -> DualAR:
    """build_tiny with the token head tied to the input embedding (F.linear(x, embeddings.weight)),
    as fish-speech models with tie_word_embeddings=True are."""
    torch.manual_seed(seed)
    return build({**TINY_CONFIG, "tie_word_embeddings": True}).eval()


def random_batch(model: DualAR, batch: int = 2, steps: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of random token grids, half of the steps semantic, the last row's tail padded."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.semantic_begin_id, (batch, steps), generator=g)
    sem = torch.randint(cfg.semantic_begin_id, cfg.semantic_end_id + 1, (batch, steps), generator=g)
    tokens = torch.where(torch.arange(steps) >= steps // 2, sem, text)
    codes = torch.randint(0, cfg.codebook_size, (batch, cfg.num_codebooks, steps), generator=g)
    grid = torch.cat([tokens[:, None], codes], dim=1)  # (B, 1 + C, T)
    inputs, labels = grid[..., :-1].clone(), grid[..., 1:].clone()
    mask = torch.ones(batch, steps - 1, dtype=torch.long)
    mask[-1, -2:] = 0
    labels[-1, :, -2:] = -100
    labels[:, 1:][labels[:, :1].expand_as(labels[:, 1:]) < cfg.semantic_begin_id] = -100
    return {"input_ids": inputs, "labels": labels, "attention_mask": mask}



def example_inputs(model: DualAR) -> dict[str, torch.Tensor]:
    """Forward arguments of a random batch (what ``lorakit export native`` checks its merge on)."""
    batch = random_batch(model)
    return {"inp": batch["input_ids"], "labels": batch["labels"], "key_padding_mask": batch["attention_mask"] == 0}
