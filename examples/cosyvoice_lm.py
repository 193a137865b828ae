"""A CosyVoice-3-style speech-token language model, as a plain PyTorch module lorakit can adapt.

The shape follows FunAudioLLM/CosyVoice ``cosyvoice/llm/llm.py`` (``CosyVoice3LM``): a transformers
causal LM (Qwen2-0.5B there) driven through ``inputs_embeds``, its own speech-token embedding whose
rows past the speech vocabulary hold the special tokens, and a decoder head ``llm_decoder`` over the
same rows. One training row is

    input:  [sos] text_emb(t_1..t_T) [task_id] speech_emb(s_1..s_S)
    target:  -100  -100 ... -100        s_1      s_2 ... s_S   eos

so the loss is on the speech tokens (and the closing eos) only. The state-dict keys are CosyVoice's
(``llm.model.model.layers.N.self_attn.q_proj.weight``, ``speech_embedding.weight``,
``llm_decoder.weight``), so its ``llm.pt`` loads with ``--weights``.

Stable interface (other code builds on it):

    CosyVoiceLM(llm: nn.Module, speech_vocab_size: int, extra_tokens: int = 200)
        llm: a transformers causal LM (Qwen2ForCausalLM, LlamaForCausalLM, ...); kept as ``self.llm.model``.
        speech_vocab_size: S, the number of speech tokens (6561 in CosyVoice 3).
        extra_tokens: rows after the speech tokens (>= 4): sos = S, eos = S + 1, task_id = S + 2,
            fill = S + 3; CosyVoice 3 reserves 200. The embedding and the head have S + extra_tokens rows.
    model(text_ids, speech_ids) -> logits (B, L, S + extra_tokens), L = max over rows of T + S + 2
    model.targets(text_ids, speech_ids) -> (B, L) next-token targets, -100 off the speech part
    model.inference(text_ids, max_len) -> greedy speech tokens for one row (stops at any id >= S)
    wrap(llm, speech_vocab_size, extra_tokens=4) -> CosyVoiceLM   # e.g. around SmolLM2
    build_tiny(seed=0), build(config=None, device=None), build_full(device="meta")
    loss(model, batch) -> {"loss", "acc"}
    example_inputs(model) -> forward keyword arguments (lorakit export native checks its merge on them)

Batch columns (pre-tokenized rows, padded by the collator): ``text_ids`` (B, T) ids of the inner LM's
tokenizer and ``speech_ids`` (B, S) speech-token ids, both padded with -100 (any negative id is
padding; each row keeps its own lengths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_ID = -100

# Fun-CosyVoice3-0.5B: Qwen2-0.5B's shapes, a 6561-token speech vocabulary and 200 reserved rows
COSYVOICE3_CONFIG = {
    "llm": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "speech_vocab_size": 6561,
    "extra_tokens": 200,
}
TINY_CONFIG = {
    "llm": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
            "tie_word_embeddings": True},
    "speech_vocab_size": 24,
    "extra_tokens": 8,
}


class LLMEncoder(nn.Module):
    """CosyVoice's ``Qwen2Encoder``: the causal LM as a hidden-state encoder over input embeddings."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past_key_values=None,
                use_cache: bool = False):
        # the decoder stack without the LM head: CosyVoice reads hidden_states[-1], the same tensor
        body = getattr(self.model, self.model.base_model_prefix)
        out = body(inputs_embeds=inputs_embeds, attention_mask=attention_mask, past_key_values=past_key_values,
                   use_cache=use_cache)
        return out.last_hidden_state, out.past_key_values  # (B, L, H)


class CosyVoiceLM(nn.Module):
    """Text tokens in, speech tokens out, through an inner causal LM (see the module docstring)."""

    def __init__(self, llm: nn.Module, speech_vocab_size: int, extra_tokens: int = 200):
        super().__init__()
        if speech_vocab_size < 1 or extra_tokens < 4:
            raise ValueError(f"need speech_vocab_size >= 1 and extra_tokens >= 4 (sos, eos, task_id, fill), got "
                             f"{speech_vocab_size} and {extra_tokens}")
        hidden = llm.get_input_embeddings().embedding_dim
        self.speech_vocab_size = speech_vocab_size
        self.sos, self.eos_token = speech_vocab_size, speech_vocab_size + 1
        self.task_id, self.fill_token = speech_vocab_size + 2, speech_vocab_size + 3
        self.llm = LLMEncoder(llm)
        self.llm_decoder = nn.Linear(hidden, speech_vocab_size + extra_tokens, bias=False)
        self.speech_embedding = nn.Embedding(speech_vocab_size + extra_tokens, hidden)

    def _rows(self, text_ids: torch.Tensor, speech_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each row's (text, speech) ids with the padding (negative ids) dropped."""
        return [(t[t >= 0], s[s >= 0]) for t, s in zip(text_ids, speech_ids, strict=True)]

    def embed(self, text_ids: torch.Tensor, speech_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds (B, L, H), attention_mask (B, L)): [sos] text [task_id] speech, right-padded."""
        text_embed = self.llm.model.get_input_embeddings()
        special = self.speech_embedding(torch.tensor([self.sos, self.task_id], device=speech_ids.device))  # (2, H)
        rows = [torch.cat([special[:1], text_embed(t), special[1:], self.speech_embedding(s)])
                for t, s in self._rows(text_ids, speech_ids)]
        lengths = torch.tensor([len(r) for r in rows], device=speech_ids.device)
        embeds = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = (torch.arange(embeds.shape[1], device=embeds.device)[None] < lengths[:, None]).long()
        return embeds, mask

    def targets(self, text_ids: torch.Tensor, speech_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) next-token targets: -100 on sos and the text, then the speech tokens and eos."""
        rows = []
        for t, s in self._rows(text_ids, speech_ids):
            ignore = torch.full((1 + len(t),), IGNORE_ID, dtype=torch.long, device=s.device)
            rows.append(torch.cat([ignore, s.long(), s.new_tensor([self.eos_token]).long()]))
        return nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=IGNORE_ID)

    def forward(self, text_ids: torch.Tensor, speech_ids: torch.Tensor) -> torch.Tensor:
        embeds, mask = self.embed(text_ids, speech_ids)
        hidden, _ = self.llm(embeds, mask)
        return self.llm_decoder(hidden)  # (B, L, S + extra_tokens)

    @torch.no_grad()
    def inference(self, text_ids, max_len: int = 64, min_len: int = 0) -> list[int]:
        """Greedy speech tokens for one row of text ids; stops at the first id >= S (eos or another
        reserved row, as CosyVoice 3's stop_token_ids), never before ``min_len`` tokens."""
        text = torch.as_tensor(text_ids, device=self.speech_embedding.weight.device).reshape(1, -1)
        embeds, mask = self.embed(text, text.new_empty(1, 0))
        out: list[int] = []
        cache = None
        for _ in range(max_len):
            hidden, cache = self.llm(embeds, mask, past_key_values=cache, use_cache=True)
            logits = self.llm_decoder(hidden[:, -1]).float()  # (1, V)
            if len(out) < min_len:
                logits[:, self.speech_vocab_size:] = float("-inf")
            token = int(logits.argmax(-1))
            if token >= self.speech_vocab_size:
                break
            out.append(token)
            embeds = self.speech_embedding(text.new_tensor([[token]]))
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        return out


def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropy on the speech tokens (+ eos), mean over them, and the accuracy there (as CosyVoice).

    Args:
        model: a CosyVoiceLM (adapted or not).
        batch: ``text_ids`` (B, T) and ``speech_ids`` (B, S), padded with -100.
    """
    logits = model(batch["text_ids"], batch["speech_ids"])  # (B, L, V); through DDP's wrapper when there is one
    target = getattr(model, "module", model).targets(batch["text_ids"], batch["speech_ids"])  # (B, L)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_ID)
    keep = target != IGNORE_ID
    acc = (logits.argmax(-1)[keep] == target[keep]).float().mean()
    return {"loss": ce, "acc": acc.detach()}


def wrap(llm: nn.Module, speech_vocab_size: int, extra_tokens: int = 4) -> CosyVoiceLM:
    """A CosyVoiceLM around an existing causal LM (e.g. SmolLM2's LlamaForCausalLM); the new speech
    embedding and head start random (train them with modules_to_save=["speech_embedding", "llm_decoder"]).

    Args:
        llm: a transformers causal LM; its weights are kept as they are.
        speech_vocab_size: number of speech tokens (e.g. a phoneme inventory).
        extra_tokens: reserved rows after them (sos, eos, task_id, fill: at least 4).
    """
    return CosyVoiceLM(llm, speech_vocab_size, extra_tokens)


def build(config: dict | None = None, device: str | torch.device | None = None) -> CosyVoiceLM:
    """A CosyVoiceLM with a random Qwen2 inside, from ``{"llm": Qwen2Config kwargs, "speech_vocab_size",
    "extra_tokens"}`` (default: the Fun-CosyVoice3-0.5B shapes).

    Args:
        config: the shapes; None is COSYVOICE3_CONFIG.
        device: where to build it ("meta" allocates nothing, for counting).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = COSYVOICE3_CONFIG if config is None else config
    with torch.device(device or "cpu"):
        llm = Qwen2ForCausalLM(Qwen2Config(**config["llm"]))
        return CosyVoiceLM(llm, config["speech_vocab_size"], config.get("extra_tokens", 200))


def build_full(device: str | torch.device = "meta") -> CosyVoiceLM:
    """Fun-CosyVoice3-0.5B's language model at full size (on the meta device by default: shapes only)."""
    return build(COSYVOICE3_CONFIG, device)


def build_tiny(seed: int = 0) -> CosyVoiceLM:
    """The same architecture at toy size, random weights (seeded), in eval mode: for tests."""
    torch.manual_seed(seed)
    return build(TINY_CONFIG).eval()


def example_inputs(model: CosyVoiceLM) -> dict[str, torch.Tensor]:
    """Two padded rows of forward arguments (what ``lorakit export native`` checks its merge on)."""
    g = torch.Generator().manual_seed(0)
    text_vocab = model.llm.model.get_input_embeddings().num_embeddings
    text = torch.randint(0, text_vocab, (2, 5), generator=g)
    speech = torch.randint(0, model.speech_vocab_size, (2, 4), generator=g)
    text[0, -1], speech[1, -1] = IGNORE_ID, IGNORE_ID
    return {"text_ids": text, "speech_ids": speech}
