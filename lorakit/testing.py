"""Tiny in-memory building blocks for tests and benchmarks (no downloads): a character-level
tokenizer with a ChatML template, shared by lorakit's own tests and bench/serve/load.py."""

from __future__ import annotations

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer():
    """A character-level tokenizer (printable ASCII + newline) with ChatML specials, built in memory."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()  # characters join back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"],
                                   chat_template=CHATML)


def write_tiny_model(folder):
    """Save a tiny random Llama (hidden 32, 2 layers, seed 0) with :func:`char_tokenizer` as a
    transformers directory (safetensors) in ``folder``; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def bpe_tokenizer():
    """A byte-level BPE tokenizer (the 256 byte symbols, a few merges, ChatML specials), built in memory:
    the kind of tokenizer GGUF files carry ("gpt2" in llama.cpp's terms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n")]
    vocab = {s: i for i, s in enumerate(alphabet + ["".join(m) for m in merges])}
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>"],
                                   chat_template=CHATML)


def write_tiny_bpe_model(folder, *, tie_word_embeddings: bool = False, seed: int = 0, model_type: str = "llama"):
    """Save a tiny random Llama (or ``model_type`` "qwen2" / "qwen3"; hidden 32, 2 layers, 4 heads, 2 kv heads)
    with :func:`bpe_tokenizer` as a transformers directory (safetensors) in ``folder``, ready to be written as
    GGUF; returns the folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = bpe_tokenizer()
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=128 if model_type == "qwen3" else 8,  # transformers reads no other for qwen3
                               max_position_embeddings=128, eos_token_id=tok.eos_token_id,
                               bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.2,
                               tie_word_embeddings=tie_word_embeddings)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random biases, where the family has them, so their layout is checked too
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def peak_allocated(fn) -> tuple[int, object]:
    """(the most bytes of CPU tensor memory live at once while ``fn()`` runs, counted from its start; fn's
    result): torch.profiler's allocation events replayed in time order, so transients inside an op count and
    memory allocated before the call does not. What the planner's rows are checked against on CPU."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))  # negative: a free
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak, out


def grpo_phase_peaks(model, objective, source, eos_ids, lr: float = 1e-3) -> tuple[int, int, list]:
    """(peak bytes of GRPO's rollout phase, of its training phase (loss, backward, AdamW step), the rollout's
    micro-batches), each measured with ``peak_allocated`` on the second step (the first warms up). The tokens
    ``eos_ids`` are masked out of the logits while sampling, so every completion runs to
    max_completion_length: the planner's worst case."""
    import torch

    eos = torch.as_tensor(eos_ids)
    hook = model.lm_head.register_forward_hook(
        lambda m, i, o: None if torch.is_grad_enabled() else o.index_fill_(-1, eos, -1e4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def train_step(batches):
        for b in batches:
            objective.loss(model, b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        train_step(objective.rollout(source, model, 0))
        rollout, batches = peak_allocated(lambda: objective.rollout(source, model, 1))
    finally:
        hook.remove()
    training, _ = peak_allocated(lambda: train_step(batches))
    return rollout, training, batches
