"""The things being measured: the base model, the batches, and the competitors built on them.

Competitors share model, data and seed: ``lorakit`` (lk.inject), ``peft`` (peft.get_peft_model with
the same LoraConfig fields) and ``full`` (every parameter trained). All train with AdamW.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import random
from typing import NamedTuple

import torch
from torch import nn

import lorakit as lk
from lorakit.data.batching import collate
from lorakit.data.readers import load_jsonl
from lorakit.data.tasks import task_path
from lorakit.data.tokenize import tokenize_examples
from lorakit.train.evaluate import loss_sum

from .harness import Context

# ---- model -------------------------------------------------------------------------------------


def _factory(spec: str) -> tuple[str, str] | None:
    module, sep, func = spec.partition(":")
    return (module, func) if sep and module.replace(".", "").replace("_", "").isalnum() else None


def preload(spec: str) -> None:
    """Import what loading ``spec`` needs (the memory worker does it once, before forking)."""
    factory = _factory(spec)
    importlib.import_module(factory[0] if factory else "lorakit.models")


def load(spec: str):
    """(model in fp32 eval mode, tokenizer or None) from a load_model spec or a 'module:function' factory."""
    factory = _factory(spec)
    if factory:
        made = getattr(importlib.import_module(factory[0]), factory[1])()
        model, tok = made if isinstance(made, tuple) else (made, None)
    else:
        from lorakit.models.load import load_model

        model, tok = load_model(spec)
    with torch.no_grad():  # weights may be lazy views of the mmapped checkpoint: make them resident and
        for t in (*model.parameters(), *model.buffers()):  # anonymous, or a step's first page-ins count as its memory
            t.data = t.data.clone()
    return model.float().eval(), tok


def base(ctx: Context) -> nn.Module:
    """A fresh copy of the base model on ctx.device (the model is loaded once per run)."""
    if "model" not in ctx._cache:
        ctx._cache["model"], ctx._cache["tokenizer"] = load(ctx.model)
    return copy.deepcopy(ctx._cache["model"]).to(ctx.device)


def tokenizer(ctx: Context):
    if "model" not in ctx._cache:
        base(ctx)
    return ctx._cache["tokenizer"]


def lora_fields(ctx: Context, dropout: float) -> dict:
    """The LoRA config, as keyword arguments both lk.LoraConfig and peft.LoraConfig accept."""
    return {"r": ctx.r, "lora_alpha": ctx.lora_alpha, "lora_dropout": dropout, "target_modules": "all-linear"}


def make_lorakit(model: nn.Module, ctx: Context, dropout: float, name: str = "default") -> nn.Module:
    torch.manual_seed(ctx.seed)
    return lk.inject(model, lk.LoraConfig(**lora_fields(ctx, dropout)), name)


def make_peft(model: nn.Module, ctx: Context, dropout: float) -> nn.Module:
    import peft

    torch.manual_seed(ctx.seed)
    return peft.get_peft_model(model, peft.LoraConfig(**lora_fields(ctx, dropout)))


def make_full(model: nn.Module, ctx: Context) -> nn.Module:
    return model.requires_grad_(True)


SHORT = {"float32": "", "bfloat16": " bf16", "float16": " fp16"}  # label suffix of a precision


class Case(NamedTuple):
    """One training competitor: LoRA (lorakit or PEFT) on a frozen base in ``dtype``, or full fine-tuning
    (fp32 weights; a half ``dtype`` runs its forward under autocast, mixed precision as usual for it)."""

    label: str
    kind: str  # "lorakit", "peft" or "full"
    dropout: float = 0.0
    dtype: str = "float32"
    checkpointing: bool = False  # activation checkpointing (non-reentrant) in every decoder block
    loss: str = "plain"  # "plain": transformers' loss over full logits; "lorakit": evaluate.loss_sum (fused)
    fused: bool = True  # lorakit: siblings' A's in one matmul (lorakit.siblings); False: one adapter at a time
    quantize: str | None = None  # "nf4", "fp4", "int8": the base's Linears quantized by lk.quantize (QLoRA)


VARIANTS = (" +ckpt", " +lk loss", " unfused")  # label suffixes of the lorakit-only variants, compared with their base case


def base_label(label: str) -> str:
    for suffix in VARIANTS:
        label = label.removesuffix(suffix)
    return label


def precision_tag(label: str) -> str:
    """The SHORT suffix of a case label's precision ("" for float32)."""
    plain = base_label(label)
    return next((tag for tag in SHORT.values() if tag and plain.endswith(tag)), "")


def competitor(kind: str, ctx: Context, dropout: float = 0.0, model: nn.Module | None = None,
               dtype: str = "float32", checkpointing: bool = False, quantize: str | None = None) -> nn.Module:
    """``model`` (default: a fresh base copy) turned into ``kind`` ("lorakit", "peft" or "full"); with
    ``quantize`` the base's Linears become bitsandbytes layers first (both competitors get the same ones)."""
    model = base(ctx) if model is None else model
    if checkpointing:
        from lorakit.train.setup import enable_checkpointing

        enable_checkpointing(model)
    if kind == "full":
        if dtype != "float32":
            model.bench_autocast = getattr(torch, dtype)  # read by train_step
        return make_full(model, ctx)
    model = model.to(getattr(torch, dtype))
    if quantize:
        lk.quantize(model, quantize, double_quant=True)
        # what transformers' BitsAndBytesConfig loader sets: PEFT then wraps with its bnb LoRA layers
        model.is_loaded_in_4bit, model.is_loaded_in_8bit = quantize != "int8", quantize == "int8"
    if kind == "lorakit":
        return make_lorakit(model, ctx, dropout)
    return make_peft(model, ctx, dropout)


def build(case: Case, ctx: Context, model: nn.Module | None = None) -> nn.Module:
    model = competitor(case.kind, ctx, case.dropout, model, case.dtype, case.checkpointing, case.quantize)
    if not case.fused:
        for module in model.modules():
            if isinstance(module, lk.LoraLinear):
                module.siblings = ()  # this model's adapters run one at a time
    return model


def training_cases(ctx: Context, variants: bool = False) -> list[Case]:
    """Per precision: full fine-tuning, then lorakit and PEFT at each dropout; ``variants`` adds lorakit
    at the largest dropout with its siblings unfused (each precision), and in fp32 with activation
    checkpointing and with lorakit's own loss."""
    cases = []
    for dtype in ctx.precisions:
        tag = SHORT[dtype]
        cases.append(Case("full" + tag, "full", 0.0, dtype))
        for p in ctx.dropouts:
            cases += [Case(f"lorakit p={p:g}{tag}", "lorakit", p, dtype), Case(f"peft p={p:g}{tag}", "peft", p, dtype)]
    if variants:
        p = max(ctx.dropouts)
        cases += [Case(f"lorakit p={p:g}{SHORT[d]} unfused", "lorakit", p, d, fused=False) for d in ctx.precisions]
        cases += [Case(f"lorakit p={p:g} +ckpt", "lorakit", p, "float32", True),
                  Case(f"lorakit p={p:g} +lk loss", "lorakit", p, "float32", loss="lorakit")]
    return cases


def loss_of(case: Case):
    return trainer_loss if case.loss == "lorakit" else plain_loss


# ---- batches -----------------------------------------------------------------------------------

def _date_records() -> list[dict]:
    return load_jsonl(task_path("dates", "train"))


def text_batch(ctx: Context, batch: int | None = None, seq: int | None = None) -> dict[str, torch.Tensor]:
    """A plain-text LM batch, every token labelled (labels = input_ids): text of the packaged
    dates task cut into rows, or random ids when the model comes without a tokenizer."""
    batch, seq = batch or ctx.batch, seq or ctx.seq
    tok = tokenizer(ctx)
    if tok is None:
        vocab = ctx._cache["model"].config.vocab_size
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(ctx.seed))
    else:
        need, text, ids = batch * seq, [], []
        for rec in _date_records():
            text.append(" ".join(m["content"] for m in rec["messages"]))
            if len(text) % 16 == 0:
                ids = tok.encode("\n".join(text), add_special_tokens=False)
                if len(ids) >= need:
                    break
        ids = torch.tensor(ids[:need]).view(batch, seq)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _conversation(shots: list[tuple[str, str]], query: tuple[str, str]) -> dict:
    lines = [f"{q} -> {a}" for q, a in shots] + [f"{query[0]} ->"]
    return {"messages": [{"role": "user", "content": "Dates to ISO 8601:\n" + "\n".join(lines)},
                         {"role": "assistant", "content": query[1]}]}


def chat_batch(ctx: Context) -> dict[str, torch.Tensor] | None:
    """A chat batch as lorakit's trainer sees it: few-shot prompts filling up to ctx.seq tokens,
    loss only on the assistant's answer (prompt labels -100). None without a chat tokenizer."""
    tok = tokenizer(ctx)
    if tok is None or not getattr(tok, "chat_template", None):
        return None
    pairs = [(r["messages"][0]["content"].split(": ", 1)[-1], r["messages"][1]["content"]) for r in _date_records()]
    rng, rows = random.Random(ctx.seed), []
    for i in range(ctx.batch):
        query, shots, fits = pairs[i], [], None
        pool = rng.sample(pairs[ctx.batch:], 64)
        while pool:
            candidate = tokenize_examples([_conversation([*shots, pool[-1]], query)], tok, 10**6)[0]
            if len(candidate.input_ids) > ctx.seq:
                break
            shots.append(pool.pop())
            fits = candidate
        rows.append(fits or tokenize_examples([_conversation([], query)], tok, ctx.seq)[0])
    return collate(rows, tok.pad_token_id)


def to_device(batch: dict[str, torch.Tensor], ctx: Context) -> dict[str, torch.Tensor]:
    return {k: v.to(ctx.device) for k, v in batch.items()}


# ---- steps -------------------------------------------------------------------------------------

def plain_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' own loss: mean next-token cross-entropy over every labelled position."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def trainer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """lorakit's trainer loss (evaluate.loss_sum): logits only where a labelled token is predicted.

    A PeftModel's forward hides ``logits_to_keep`` behind **kwargs, so it gets its inner
    transformers model (with PEFT's LoRA layers in it): every competitor takes the same path.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    loss, n = loss_sum(inner, batch)
    return loss / n


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context, loss_fn=plain_loss):
    """A closure doing one AdamW step on ``batch``; its losses collect in ``step.losses``.

    Dropout masks are reseeded per call, so every competitor draws the same random stream.
    """
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ctx.lr)

    autocast = getattr(model, "bench_autocast", None)
    device_type = torch.device(ctx.device).type

    def step() -> None:
        torch.manual_seed(ctx.seed + len(step.losses))
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, autocast) if autocast else contextlib.nullcontext():
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        step.losses.append(loss.detach())

    step.losses = []
    return step
