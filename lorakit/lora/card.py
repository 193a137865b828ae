"""The adapter's ``README.md`` model card, laid out as PEFT writes it.

YAML front matter (``base_model``, ``library_name: peft``, ``pipeline_tag``, ``tags``: what the Hub
indexes and what PEFT's ``create_or_update_model_card`` writes), the LoRA configuration, any extra
sections a caller adds (``lorakit train``: training data and results; other features: their own
lines), and how to load the adapter with lorakit and with PEFT.

A card lorakit wrote carries :data:`MARK` and is rewritten on every save; a ``README.md`` without it
(the user's own, or PEFT's) is never overwritten: the save says so and leaves it as it is.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import yaml

from ..fileio import atomic_write_text
from .config import LoraConfig, moves_base

CARD_NAME = "README.md"
MARK = "<!-- model card written by lorakit: rewritten on every save; remove this line to keep your edits -->"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
Sections = dict[str, "str | list[str]"]


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` is an ``org/name`` the Hub can index (a local path is not: the Hub refuses it
    as ``base_model``, so the card names a local base in its text only)."""
    return bool(name) and bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def front_matter(cfg: LoraConfig, transformers_model: bool = True) -> dict:
    """The card's YAML metadata, as PEFT writes it (``base_model`` and its tag only for a hub id)."""
    base = cfg.base_model_name_or_path
    tags = ["lora", "lorakit"] + (["transformers"] if transformers_model else [])
    meta: dict = {}
    if is_hub_id(base):
        meta["base_model"] = base
        tags.append(f"base_model:adapter:{base}")
    meta["library_name"] = "peft"
    if cfg.task_type == "CAUSAL_LM":
        meta["pipeline_tag"] = "text-generation"
    meta["tags"] = sorted(tags)
    return meta


def _config_lines(cfg: LoraConfig) -> list[str]:
    scaling = "lora_alpha / sqrt(r)" if cfg.use_rslora else "lora_alpha / r"
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else ", ".join(cfg.target_modules or [])
    lines = [f"- r: {cfg.r}", f"- lora_alpha: {cfg.lora_alpha:g} (scaling = {scaling})",
             f"- lora_dropout: {cfg.lora_dropout:g}", f"- target_modules: {targets}"]
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(cfg, name)
        if pattern:
            lines.append(f"- {name}: {len(pattern)} modules differ ({', '.join(list(pattern)[:3])}"
                         f"{', ...' if len(pattern) > 3 else ''})")
    if cfg.modules_to_save:
        lines.append(f"- modules_to_save: {', '.join(cfg.modules_to_save)}")
    if cfg.fan_in_fan_out:
        lines.append("- fan_in_fan_out: true (Conv1D layers, GPT-2 style)")
    if cfg.use_dora:
        lines.append("- use_dora: true (DoRA: a learned magnitude per output feature; merge it to serve it with vLLM)")
    if cfg.bias != "none":
        lines.append(f"- bias: {cfg.bias} (the trained biases are in the file and replace the base's when loaded)")
    if moves_base(cfg.init_lora_weights):
        lines.append(f"- init_lora_weights: {cfg.init_lora_weights} — **this adapter needs the modified (residual) "
                     "base** W − s·B₀·A₀ it was trained on, not the original base. PEFT and lorakit rebuild it by "
                     "redoing the decomposition when they load the adapter (exactly for pissa and olora, approximately "
                     "for pissa_niter_K); tools that load LoRA factors onto the original base (vLLM, llama.cpp, "
                     "merging elsewhere) get a wrong model. Save with convert_to_lora=True for a plain LoRA.")
    return lines


def _usage(base: str, adapter_dir: str) -> list[str]:
    return [
        "With lorakit:", "", "```bash", f'lorakit generate --adapter {adapter_dir} "Your prompt"', "```", "",
        "```python", "import lorakit as lk", "from lorakit.models.load import load_model", "",
        f'model, tokenizer = load_model("{base}")', f'lk.load_adapter(model, "{adapter_dir}")', "```", "",
        "With PEFT (`AutoPeftModelForCausalLM.from_pretrained(\"" + adapter_dir + "\")` finds the base by "
        "itself from adapter_config.json):", "", "```python", "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM", "", f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{adapter_dir}")', "```",
    ]


def _section(title: str, body: str | list[str]) -> list[str]:
    return [f"## {title}", "", *(body.splitlines() if isinstance(body, str) else body), ""]


def model_card(cfg: LoraConfig, sections: Sections | None = None, *, adapter_dir: str = "ADAPTER_DIR",
               transformers_model: bool = True) -> str:
    """The text of an adapter's ``README.md``.

    Args:
        cfg: the adapter's config (as saved in adapter_config.json).
        sections: extra ``## title`` sections in order, each a text or a list of lines (bullets, tables).
        adapter_dir: how the usage snippets refer to the adapter directory.
        transformers_model: the base is a transformers model (PEFT's ``transformers`` tag).
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("lorakit")
    except PackageNotFoundError:
        ours = "unknown"
    base = cfg.base_model_name_or_path or "BASE_MODEL"
    where = "" if is_hub_id(base) else " (a local path: PEFT and vLLM need it on this machine)"
    lines = ["---", yaml.safe_dump(front_matter(cfg, transformers_model), sort_keys=False).rstrip(), "---", MARK, "",
             "# LoRA adapter", "", f"A LoRA adapter for `{base}`{where}, saved by lorakit in PEFT's format "
             "(`adapter_config.json` + `adapter_model.safetensors`).", ""]
    lines += _section("LoRA configuration", _config_lines(cfg))
    for title, body in (sections or {}).items():
        lines += _section(title, body)
    lines += _section("How to load it", _usage(base, adapter_dir))
    lines += ["### Framework versions", "", f"- lorakit {ours}", "- PEFT format (adapter_config.json + safetensors)"]
    return "\n".join(lines) + "\n"


def write_model_card(path: str | Path, cfg: LoraConfig, sections: Sections | None = None, *,
                     transformers_model: bool = True) -> Path:
    """Write (atomically) ``path/README.md`` for the adapter in ``path``; returns the card's path.

    A ``README.md`` already there that lorakit did not write (no :data:`MARK`) is kept, with a warning.

    Args:
        path: the adapter directory.
        cfg: the adapter's config.
        sections: extra sections, as :func:`model_card` takes them.
        transformers_model: the base is a transformers model.
    """
    card = Path(path) / CARD_NAME
    if card.is_file() and MARK not in card.read_text(errors="replace"):
        warnings.warn(f"{card}: kept as it is (not a card lorakit wrote); the adapter's configuration is in "
                      f"adapter_config.json (delete {CARD_NAME} to have lorakit write its card)", stacklevel=3)
        return card
    atomic_write_text(card, model_card(cfg, sections, adapter_dir=str(path), transformers_model=transformers_model))
    return card
