"""Figure 1: training step time, lorakit vs PEFT (dropout 0 and 0.05) and full fine-tuning.

A step is zero_grad, forward, loss, backward, AdamW step. Every competitor computes the same loss
(transformers' ``model(input_ids, labels=labels).loss`` on a text batch with every token labelled),
so the comparison is about the adapters, not about the loss. Each precision of ``ctx.precisions``
gets its own table: an fp32 model, and a bf16 frozen base (LoRA's optional fast path where the
hardware has bf16 units; full fine-tuning then runs fp32 weights under autocast). A second table times lorakit's own
trainer loss (evaluate.loss_sum: logits only at labelled positions) on a chat batch whose loss
covers the answers alone, for full fine-tuning and both adapters at the larger dropout.
"""

from __future__ import annotations

from ..harness import Context, alternate, fmt_median, ratio, summary, target
from ..workload import (
    SHORT,
    base_label,
    build,
    chat_batch,
    competitor,
    loss_of,
    precision_tag,
    text_batch,
    to_device,
    train_step,
    trainer_loss,
    training_cases,
)

NAME, FIGURE, TITLE = "train_step", 1, "Training step time"
WHAT = ("Seconds per training step (zero_grad, forward, loss, backward, AdamW step). Ratios < 1: lorakit "
        "is faster. All competitors compute the same loss: transformers' model(input_ids, labels=labels).loss "
        "on a text batch where every token is labelled, so the difference is the adapters alone.")


def measure(ctx: Context, log) -> dict:
    """Time every training case side by side; shared with figure 3 (lora_vs_full)."""
    batch = to_device(text_batch(ctx), ctx)
    cases = training_cases(ctx, variants=True)
    steps = {c.label: train_step(build(c, ctx), batch, ctx, loss_of(c)) for c in cases}
    log(f"  text batch {tuple(batch['input_ids'].shape)}, competitors: {', '.join(steps)}")
    samples = alternate(steps, ctx, log=log)
    first_loss = {label: float(step.losses[0]) for label, step in steps.items()}
    del steps  # frees the models and optimizer states before the chat row
    chat = _chat_row(ctx, log)
    return {"samples": samples, "first_loss": first_loss, "chat": chat,
            "hidden_size": _config(ctx).hidden_size, "batch_shape": list(batch["input_ids"].shape)}


def _config(ctx: Context):
    return ctx._cache["model"].config


def _chat_row(ctx: Context, log) -> dict | None:
    batch = chat_batch(ctx)
    if batch is None:
        return None
    batch = to_device(batch, ctx)
    p = max(ctx.dropouts)
    cases = [("full", "full", 0.0), (f"lorakit p={p:g}", "lorakit", p), (f"peft p={p:g}", "peft", p)]
    steps = {label: train_step(competitor(kind, ctx, q), batch, ctx, trainer_loss) for label, kind, q in cases}
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    positions = int((batch["labels"][:, 1:] != -100).any(dim=0).sum())
    log(f"  chat batch {tuple(batch['input_ids'].shape)}: {labelled} labelled tokens at {positions} positions")
    return {"samples": alternate(steps, ctx, log=log), "dropout": p, "shape": list(batch["input_ids"].shape),
            "labelled_tokens": labelled, "logit_positions": positions}


def _rows(samples: dict, losses: dict | None = None, tag: str = "") -> list[list[str]]:
    """One table's rows: the cases of one precision (label suffix ``tag``), plus lorakit's variants (+ckpt, +lk loss)."""
    rows = []
    for label, s in samples.items():
        if precision_tag(label) != tag:
            continue
        plain = base_label(label)
        row = [label, fmt_median(summary(s))]
        if label != plain:  # a variant: what it costs or saves, against the same case without it
            row.append(f"{ratio(s, samples[plain])['value']:.2f}× {plain}")
        elif label.startswith("lorakit"):
            r = ratio(s, samples["peft" + plain.removeprefix("lorakit")])
            row.append(f"**{r['value']:.3f}** ±{r['noise']:.1%}")
        else:
            row.append("")
        row.append("" if label.startswith("full") else f"{ratio(s, samples['full' + tag])['value']:.3f}")
        if losses is not None:
            row.append(f"{losses[label]:.4f}")
        rows.append(row)
    return rows


def _targets(ctx: Context, samples: dict) -> list[dict]:
    out = []
    for dtype in ctx.precisions:
        tag = SHORT[dtype]
        for p in ctx.dropouts:
            lk_s, pf_s = samples[f"lorakit p={p:g}{tag}"], samples[f"peft p={p:g}{tag}"]
            r = ratio(lk_s, pf_s)
            limit = 1.0 if p == 0 else 0.85
            if p > 0 and 0.0 in ctx.dropouts:
                d_lk = ratio(lk_s, samples[f"lorakit p=0{tag}"])["value"] - 1
                d_pf = ratio(pf_s, samples[f"peft p=0{tag}"])["value"] - 1
                at0 = ratio(samples[f"lorakit p=0{tag}"], samples[f"peft p=0{tag}"])["value"]
                why = (f"dropout p={p:g} adds {d_lk:+.0%} to lorakit's step and {d_pf:+.0%} to PEFT's (vs p=0; "
                       f"there lorakit / PEFT = {at0:.3f}): the rest of the step is the frozen base's own work, "
                       "the same in both")
            else:
                why = (f"lorakit/full = {ratio(lk_s, samples['full' + tag])['value']:.3f} vs PEFT/full = "
                       f"{ratio(pf_s, samples['full' + tag])['value']:.3f}: lorakit's adapter path costs more per step")
            out.append(target(f"train step, lorakit / PEFT at dropout {p:g}, {dtype} base", r["value"], limit, why,
                              noise=r["noise"]))
    return out


def run(ctx: Context, done: dict, log) -> dict:
    data = measure(ctx, log)
    done["_train_step_data"] = data  # figure 3 reads the same measurements
    shape = f"{data['batch_shape'][0]}×{data['batch_shape'][1]}"
    tables = []
    for dtype in ctx.precisions:
        base = ("fp32 model" if dtype == "float32" else
                f"LoRA on a {dtype} frozen base (adapters fp32); full FT keeps fp32 weights and runs under "
                f"autocast({dtype})")
        tables.append({"caption": f"Text batch {shape}, every token labelled, loss = model(input_ids, "
                                  f"labels=labels).loss; {base}",
                       "columns": ["competitor", "step (median ±½IQR)", "lorakit / PEFT", "/ full FT",
                                   "loss, 1st step"],
                       "rows": _rows(data["samples"], data["first_loss"], SHORT[dtype])})
    notes = ["The 1st-step losses agree within a precision: B = 0 at init, so every competitor starts as the "
             "base model.",
             "+ckpt: lorakit with activation checkpointing in every decoder block (non-reentrant; figure 2 shows "
             "the memory it saves). +lk loss: lorakit's trainer loss (evaluate.loss_sum: the head and the "
             "cross-entropy fused, logits made in chunks and never kept) instead of transformers' loss. unfused: "
             "lorakit with each adapter's A run alone (no sibling fusion), to show what fusing q/k/v and gate/up "
             "saves.",
             "full FT trains all parameters (tied embeddings included) with the same AdamW; it has no LoRA "
             "dropout, so it is measured once."]
    chat = data["chat"]
    if chat:
        tables.append({"caption": f"Chat batch {chat['shape'][0]}×{chat['shape'][1]} (few-shot date prompts), "
                                  f"loss on the {chat['labelled_tokens']} answer tokens only, lorakit's trainer "
                                  f"loss (evaluate.loss_sum: the head fused with the cross-entropy, logits for the "
                                  f"{chat['labelled_tokens']} labelled tokens only)",
                       "columns": ["competitor", "step (median ±½IQR)", "lorakit / PEFT", "/ full FT"],
                       "rows": _rows(chat["samples"])})
        notes.append("In the chat table PEFT's model is called through get_base_model(), since PeftModel.forward "
                     "does not pass logits_to_keep on: all three take the same loss path.")
    else:
        notes.append("No chat table: the model has no tokenizer with a chat template.")
    summaries = {k: summary(v) for k, v in data["samples"].items()}
    return {"what": WHAT, "tables": tables, "notes": notes, "targets": _targets(ctx, data["samples"]),
            "data": {"steps": summaries, "first_loss": data["first_loss"],
                     "chat": chat and {**chat, "samples": {k: summary(v) for k, v in chat["samples"].items()}}}}
