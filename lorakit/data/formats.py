"""Record formats: what a valid training record looks like, checked before any model loads.

- text ``{"text": ...}``: loss on every token; eos is appended.
- prompt/completion ``{"prompt": ..., "completion": ...}``: loss on the completion and its eos.
- messages ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's
  chat template; loss on each assistant message's content and the end-of-turn token that closes it.
- alpaca ``{"instruction": ..., "input": ... (optional), "output": ...}``: a user turn (the
  instruction, then the input after a blank line when there is one) and the assistant's output.
- sharegpt ``{"conversations": [{"from": ..., "value": ...}, ...]}``: roles human, gpt, system,
  tool, read as user, assistant, system, tool.

alpaca and sharegpt records become messages (``to_canonical``), so they train like messages.
Other column names map onto these with ``parse_columns`` (``prompt=question``).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, DataError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}
# the key that names each format, in the order formats are told apart
FORMAT_KEYS = {"text": "text", "prompt": "prompt_completion", "messages": "messages", "instruction": "alpaca",
               "conversations": "sharegpt"}
FORMAT_NAMES = {"text": "text", "prompt_completion": "prompt/completion", "messages": "messages",
                "alpaca": "alpaca", "sharegpt": "sharegpt"}
COLUMNS = ("text", "prompt", "completion", "messages", "instruction", "input", "output", "system",
           "conversations")
_EXPECTED = ("a 'text', 'prompt'+'completion', 'messages', 'instruction'+'output' (alpaca) or "
             "'conversations' (sharegpt) key")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def parse_columns(specs: list[str] | None) -> dict[str, str]:
    """``["prompt=question", "completion=answer"]`` → ``{"prompt": "question", "completion": "answer"}``.

    Args:
        specs: ``FIELD=COLUMN`` pairs: FIELD one of ``COLUMNS``, COLUMN the name in the file.
    """
    mapping: dict[str, str] = {}
    for spec in specs or []:
        field, sep, column = str(spec).partition("=")
        field, column = field.strip(), column.strip()
        if not sep or not field or not column:
            raise ConfigError(f"--columns {spec!r}: expected FIELD=COLUMN, e.g. prompt=question")
        if field not in COLUMNS:
            raise ConfigError(f"--columns {spec!r}: unknown field {field!r}; expected one of {', '.join(COLUMNS)}")
        if field in mapping:
            raise ConfigError(f"--columns maps {field!r} twice ({mapping[field]!r} and {column!r})")
        mapping[field] = column
    return mapping


def rename_columns(obj: Any, columns: dict[str, str], where: str) -> Any:
    """The record with each mapped COLUMN renamed to its FIELD (no-op without a mapping)."""
    if not columns or not isinstance(obj, dict):
        return obj
    out = dict(obj)
    for field, column in columns.items():
        if column not in obj:
            raise DataError(f"{where}: column {column!r} (mapped to {field!r} by --columns) not found; found "
                            f"keys {sorted(obj)}")
        out.pop(field, None)  # the mapped column replaces a same-named one
    for column in columns.values():
        out.pop(column, None)
    for field, column in columns.items():
        out[field] = obj[column]
    return out


def validate_record(obj: Any, where: str) -> str:
    """Check one record and return its format: text, prompt_completion, messages, alpaca or sharegpt.

    Args:
        obj: a parsed record (a JSON object, a table row).
        where: location for error messages (``file:line`` or ``file:row``).
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {_json_type(obj)}")
    # a table row has every column, null where unused: a null key names a format only if no other does
    present = [k for k in FORMAT_KEYS if obj.get(k) is not None] or [k for k in FORMAT_KEYS if k in obj]
    if not present:
        raise DataError(f"{where}: expected {_EXPECTED}; found keys {sorted(obj)} (map other names with "
                        "--columns, e.g. prompt=question)")
    if len(present) > 1:
        raise DataError(f"{where}: found keys {present}; expected exactly one of 'text', 'prompt'+'completion', "
                        "'messages', 'instruction'+'output', 'conversations'")
    fmt = FORMAT_KEYS[present[0]]
    if fmt == "text":
        _require_str(obj, "text", where)
    elif fmt == "prompt_completion":
        _require_both(obj, "prompt", "completion", where)
    elif fmt == "alpaca":
        _require_both(obj, "instruction", "output", where)
        for key in ("input", "system"):
            if obj.get(key) is not None:
                _require_str(obj, key, where)
    elif fmt == "sharegpt":
        _check_messages(_sharegpt_messages(obj["conversations"], where), where, "conversations")
    else:
        _check_messages(obj["messages"], where)
    return fmt


def to_canonical(obj: dict, fmt: str) -> dict:
    """A validated record as text, prompt/completion or messages (alpaca and sharegpt become messages)."""
    if fmt == "alpaca":
        user = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
        system = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
        return {"messages": [*system, {"role": "user", "content": user},
                             {"role": "assistant", "content": obj["output"]}]}
    if fmt == "sharegpt":
        return {"messages": _sharegpt_messages(obj["conversations"], "")}
    return obj


def _sharegpt_messages(turns: Any, where: str) -> Any:
    if not isinstance(turns, list) or not turns:
        found = "an empty array" if turns == [] else _json_type(turns)
        raise DataError(f"{where}: 'conversations' must be a non-empty array of {{from, value}} objects, "
                        f"found {found}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: conversations[{i}] must be an object with 'from' and 'value', "
                            f"found {_json_type(turn)}")
        for key in ("from", "value"):
            if not isinstance(turn.get(key), str):
                found = "nothing" if key not in turn else _json_type(turn[key])
                raise DataError(f"{where}: conversations[{i}].{key} must be a string, found {found}")
        if turn["from"] not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{i}] is from {turn['from']!r}; expected one of "
                            f"{', '.join(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return out


def _check_messages(messages: Any, where: str, key: str = "messages") -> None:
    if not isinstance(messages, list) or not messages:
        found = "an empty array" if messages == [] else _json_type(messages)
        raise DataError(f"{where}: 'messages' must be a non-empty array of {{role, content}} objects, found {found}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content', "
                            f"found {_json_type(msg)}")
        for field in ("role", "content"):
            if not isinstance(msg.get(field), str):
                found = "nothing" if field not in msg else _json_type(msg[field])
                raise DataError(f"{where}: messages[{i}].{field} must be a string, found {found}")
        if msg["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has unknown role {msg['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
    if messages[0]["role"] == "assistant":  # its start cannot be found: templates refuse an empty conversation
        raise DataError(f"{where}: {key}[0] is from the assistant; expected a system or user message first")


def _require_both(obj: dict, first: str, second: str, where: str) -> None:
    if second not in obj:
        raise DataError(f"{where}: has '{first}' but no '{second}'; expected both")
    _require_str(obj, first, where)
    _require_str(obj, second, where)


def _require_str(obj: dict, key: str, where: str) -> None:
    if not isinstance(obj[key], str):
        raise DataError(f"{where}: '{key}' must be a string, found {_json_type(obj[key])}")


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)
