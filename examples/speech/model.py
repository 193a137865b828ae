"""The speech demo's model: SmolLM2-135M-Instruct wrapped CosyVoice-style to speak Norwegian phonemes.

``build()`` loads the embedded SmolLM2 through lorakit and wraps it with ``examples/cosyvoice_lm.py``:
the phoneme inventory (``inventory.json``, 55 symbols) is the speech vocabulary, followed by the four
reserved rows (sos, eos, task_id, fill). The new ``speech_embedding`` and ``llm_decoder`` start from
SmolLM2's own token embeddings of each symbol's spelling (its input and output embeddings are tied,
so a phoneme ``ʃ`` starts where the text token ``ʃ`` is, for reading and for writing); the reserved
rows start from the embeddings of ``<|im_start|>``, ``<|im_end|>``, ``:`` and ``<|endoftext|>``.
LoRA (r=24 on the seven projections) adapts the LM; the two new modules are trained whole and
saved with the adapter (``modules_to_save``).

``greedy(model, rows)`` decodes speech tokens until eos for many words at once (left-padded
prompts, one KV cache), the same tokens as ``CosyVoiceLM.inference`` one row at a time.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
INVENTORY = HERE / "inventory.json"
SPEC = "smollm2-135m-instruct"
SPECIAL_TEXT = ("<|im_start|>", "<|im_end|>", ":", "<|endoftext|>")  # sos, eos, task_id, fill
MODULES_TO_SAVE = ["speech_embedding", "llm_decoder"]


def cosyvoice():
    """``examples/cosyvoice_lm.py`` as a module (examples/ is not a package)."""
    name = "lorakit_example_cosyvoice_lm"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE.parent / "cosyvoice_lm.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def inventory(path: Path = INVENTORY) -> list[str]:
    """The phoneme symbols in id order."""
    return json.loads(Path(path).read_text(encoding="utf-8"))["symbols"]


def build():
    """SmolLM2-135M-Instruct wrapped as a CosyVoice-style LM over the phoneme inventory, new rows
    initialised from the text embeddings (see the module docstring). Returns ``(model, tokenizer)``."""
    from lorakit.models.load import load_model

    llm, tokenizer = load_model(SPEC)
    symbols = inventory()
    model = cosyvoice().wrap(llm, len(symbols))
    init_from_text(model, tokenizer, symbols)
    model.name_or_path = f"{Path(__file__).resolve()}:build"
    return model.eval(), tokenizer


@torch.no_grad()
def init_from_text(model: nn.Module, tokenizer, symbols: list[str]) -> None:
    """Row i of the speech embedding and of the decoder head := the mean text embedding of symbol i's
    tokens; the reserved rows := the embeddings of SPECIAL_TEXT.

    Args:
        model: a CosyVoiceLM whose speech vocabulary is ``symbols`` (4 reserved rows after them).
        tokenizer: the inner LM's tokenizer.
        symbols: the phoneme symbols in id order.
    """
    table = model.llm.model.get_input_embeddings().weight  # (text vocab, H)
    ids = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in symbols]
    ids += [[tokenizer.convert_tokens_to_ids(t)] for t in SPECIAL_TEXT]
    init = torch.stack([table[i].float().mean(0) for i in ids])  # (S + 4, H)
    model.speech_embedding.weight.copy_(init)
    model.llm_decoder.weight.copy_(init)


@torch.no_grad()
def greedy(model: nn.Module, text_rows: list[list[int]], max_len: int = 24, batch_size: int = 64) -> list[list[int]]:
    """Greedy speech tokens for each row of text ids, until the first id >= S (eos or another reserved
    row) or ``max_len`` tokens: ``CosyVoiceLM.inference`` for many rows at once.

    Prompts ``[sos] text [task_id]`` are left-padded (masked) so that every row's next token is the
    last position; rotary positions shift by the padding, which attention (relative positions) does
    not see.

    Args:
        model: a CosyVoiceLM (adapted or not).
        text_rows: token ids of the inner LM's tokenizer, one list per word.
        max_len: the most speech tokens per row.
        batch_size: rows decoded together.
    """
    out: list[list[int]] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(text_rows), batch_size):
        out += _greedy_batch(model, text_rows[start:start + batch_size], max_len)
    model.train(was_training)
    return out


def _greedy_batch(model: nn.Module, text_rows: list[list[int]], max_len: int) -> list[list[int]]:
    text_embed = model.llm.model.get_input_embeddings()
    device = text_embed.weight.device  # (speech_embedding may be a modules_to_save wrapper, with no .weight)
    S = model.speech_vocab_size
    special = model.speech_embedding(torch.tensor([model.sos, model.task_id], device=device))  # (2, H)
    prompts = [torch.cat([special[:1], text_embed(torch.tensor(t, device=device)), special[1:]]) for t in text_rows]
    width = max(len(p) for p in prompts)
    embeds = torch.stack([torch.cat([p.new_zeros(width - len(p), p.shape[1]), p]) for p in prompts])  # (B, W, H)
    mask = torch.stack([torch.arange(width, device=device) >= width - len(p) for p in prompts]).long()  # (B, W)
    tokens = torch.empty(len(prompts), 0, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    cache = None
    for _ in range(max_len):
        hidden, cache = model.llm(embeds, mask, past_key_values=cache, use_cache=True)
        token = model.llm_decoder(hidden[:, -1]).float().argmax(-1)  # (B,)
        done |= token >= S
        if bool(done.all()):
            break
        token = token.masked_fill(done, S + 1)  # finished rows carry eos from here on
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        embeds = model.speech_embedding(token)[:, None]  # (B, 1, H)
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
    return [[int(t) for t in row if t < S] for row in tokens]
