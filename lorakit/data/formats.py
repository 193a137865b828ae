"""Record formats: what a valid training record looks like, checked before any model loads.

- ``{"text": ...}``: loss on every token; eos is appended.
- ``{"prompt": ..., "completion": ...}``: loss on the completion and the eos appended to it.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template; loss on each assistant message's content and the end-of-turn token that closes it.
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError

ROLES = ("system", "user", "assistant", "tool")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}



def validate_record(obj: Any, where: str) -> str:
    """Check one record and return its format: "text", "prompt_completion" or "messages".

    Args:
        obj: a parsed JSON value.
        where: location for error messages (``file:line``).
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {_json_type(obj)}")
    present = [k for k in ("text", "prompt", "messages") if k in obj]
    if not present:
        raise DataError(f"{where}: expected a 'text', 'prompt'+'completion' or 'messages' key; found keys "
                        f"{sorted(obj)}")
    if len(present) > 1:
        raise DataError(f"{where}: found keys {present}; expected exactly one of 'text', "
                        "'prompt'+'completion', 'messages'")
    if "text" in obj:
        _require_str(obj, "text", where)
        return "text"
    if "prompt" in obj:
        if "completion" not in obj:
            raise DataError(f"{where}: has 'prompt' but no 'completion'; expected both")
        _require_str(obj, "prompt", where)
        _require_str(obj, "completion", where)
        return "prompt_completion"
    _check_messages(obj["messages"], where)
    return "messages"


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        found = "an empty array" if messages == [] else _json_type(messages)
        raise DataError(f"{where}: 'messages' must be a non-empty array of {{role, content}} objects, found {found}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content', "
                            f"found {_json_type(msg)}")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                found = "nothing" if key not in msg else _json_type(msg[key])
                raise DataError(f"{where}: messages[{i}].{key} must be a string, found {found}")
        if msg["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has unknown role {msg['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
    if messages[0]["role"] == "assistant":  # its start cannot be found: templates refuse an empty conversation
        raise DataError(f"{where}: messages[0] is from the assistant; expected a system or user message first")


def _require_str(obj: dict, key: str, where: str) -> None:
    if not isinstance(obj[key], str):
        raise DataError(f"{where}: '{key}' must be a string, found {_json_type(obj[key])}")


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)
