"""A run's data: read and checked before the model loads, tokenized (or loaded from the token cache)
once the tokenizer is known, and described at the start of the run and in summary.json. Pre-tokenized
rows (``data/pretokenized.py``) skip the tokenizer: they are batched as they are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.cache import cached_tokenize, default_cache_dir
from ..data.formats import parse_columns
from ..data.pretokenized import TokenRowDataset, TokenRows, is_pretokenized, parse_pad_values, read_token_rows
from ..data.readers import Records, read_records
from ..data.tokenize import TokenizedDataset
from ..errors import ConfigError

SUGGEST_PACKING = 0.3  # padding share above which the report suggests --packing


def read_splits(cfg, train: Path, eval_: Path | None) -> dict[str, Records | TokenRows | None]:
    """The train and eval records (text formats, or pre-tokenized rows), validated (errors name file:line)
    before any model is loaded."""
    columns = parse_columns(cfg.columns)
    splits = {"train": read_data(train, columns), "eval": read_data(eval_, columns) if eval_ else None}
    if any(isinstance(r, TokenRows) for r in splits.values()):
        if cfg.packing:
            raise ConfigError("--packing joins tokenized text examples into rows; pre-tokenized rows are batched "
                              "whole (--group-by-length batches rows of similar lengths)")
        if not all(r is None or isinstance(r, TokenRows) for r in splits.values()):
            raise ConfigError(f"{train} and {eval_}: one holds pre-tokenized rows and the other text; give both "
                              "splits in the same form")
        parse_pad_values(cfg.pad_value)  # a malformed --pad-value fails before the model loads
    return splits


def read_data(path: Path, columns: dict[str, str]) -> Records | TokenRows:
    """Pre-tokenized rows when the file holds them, else text records."""
    if is_pretokenized(path):
        if columns:
            raise ConfigError(f"{path}: --columns maps text-format fields; pre-tokenized rows are passed to the model "
                              "and the loss under their own column names")
        return read_token_rows(path)
    return read_records(path, columns)


def cache_dir(cfg) -> Path | None:
    """The token cache directory of a recipe (None: caching off)."""
    if cfg.data_cache == "off":
        return None
    return Path(cfg.data_cache) if cfg.data_cache else default_cache_dir()


def tokenize_splits(records: dict[str, Records | TokenRows | None], tokenizer: Any, cfg, info, progress: bool = True
                    ) -> tuple[dict[str, TokenizedDataset | TokenRowDataset | None], dict[str, str]]:
    """Each split's tokenized set and what the cache did ("hit", "built", ...); pre-tokenized rows as they
    are ("not needed").

    Rank 0 tokenizes (and fills the cache) first; the other ranks then load its entry instead of
    tokenizing the same data again.
    """
    from .distributed import barrier

    datasets: dict[str, TokenizedDataset | None] = {}
    outcome: dict[str, str] = {}
    if not info.main:
        barrier(info)  # rank 0 fills the cache first
    for split, recs in records.items():
        if recs is None:
            datasets[split] = None
            continue
        if isinstance(recs, TokenRows):
            datasets[split], outcome[split] = recs.to_dataset(cfg.max_seq_len, parse_pad_values(cfg.pad_value)), \
                "not needed (token ids)"
            continue
        if tokenizer is None:
            raise ConfigError(f"{recs.path}: text data needs a tokenizer, and the model came without one; give "
                              "pre-tokenized rows (input_ids ...), or return (module, tokenizer) from the builder")
        datasets[split], outcome[split] = cached_tokenize(recs, tokenizer, cfg.max_seq_len, cache_dir(cfg),
                                                          cfg.num_proc, progress and info.main)
    if info.main:
        barrier(info)
    return datasets, outcome


def data_report(records: dict[str, Records | None], datasets: dict[str, TokenizedDataset | None],
                outcome: dict[str, str], batches, cfg) -> dict[str, Any]:
    """The figures of summary.json's ``data`` (per split), and the lines printed at the start of the run."""
    report: dict[str, Any] = {}
    for split, ds in datasets.items():
        if ds is None:
            report[split] = None
            continue
        report[split] = {**vars(ds.stats), "file": str(records[split].path), "format": records[split].describe(),
                         "token_cache": outcome[split]}
    report["train"].update(batches.describe())
    return report


def report_lines(report: dict[str, Any], cfg) -> list[str]:
    lines = []
    for split, r in report.items():
        if r is None:
            continue
        lines.append(f"{split} data: {r['file']}: {r['format']}; token cache: {r['token_cache']}")
        lines.append(f"  {r['n_examples']:,} examples, {r['n_tokens']:,} tokens ({r['n_trainable_tokens']:,} trained "
                     f"on); {r['n_truncated']:,} cut to max_seq_len={cfg.max_seq_len}, {r['n_dropped']:,} dropped "
                     "(nothing left to train on)")
    train = report["train"]
    if "layout" in train:  # preference pairs (objectives/preference.py)
        lines.append(f"  pairs laid out {train['layout']} (--pair-layout): {train['tokens_vs_padded']:.0%} of the tokens "
                     f"of padded rows; {train['padding_fraction']:.1%} padding")
    elif "fill_rate" in train:
        lines.append(f"  packed into {train['packed_rows']:,} rows of {cfg.max_seq_len} tokens: "
                     f"{train['fill_rate']:.1%} full; batches {train['padding_fraction']:.1%} padding")
    else:
        hint = " (variable lengths: --packing or --group-by-length would cut it)" if \
            train["padding_fraction"] > SUGGEST_PACKING and not cfg.group_by_length else ""
        lines.append(f"  batches {train['padding_fraction']:.1%} padding{hint}")
    return lines


def check_memory(fit_check, model, train_ds: TokenizedDataset, cfg, dtype: str, info) -> None:
    """Before the first step: the planner's peak for the longest micro-batch against free memory
    (``plan.fit.check_fit``); warn when it may not fit, or turn checkpointing on for "auto"."""
    from .setup import enable_checkpointing

    width = cfg.max_seq_len if cfg.packing else int(train_ds.lengths.max())
    stats = train_ds.stats
    verdict = fit_check(cfg, dtype, info.device, width, stats.n_trainable_tokens / stats.n_tokens, info.world)
    auto = cfg.gradient_checkpointing == "auto"
    if not verdict.fits and auto:
        enable_checkpointing(model)
    if info.main:
        then = ("; --gradient-checkpointing auto: turned on" if auto else
                "; lower --batch-size or --max-seq-len, or pass --gradient-checkpointing") if not verdict.fits else ""
        print(f"lorakit: memory: {verdict.message}{then}", flush=True)
