"""Request bodies of the OpenAI-compatible API (pydantic), and the JSON shapes of its answers."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..generate.rows import Event

_MAX_STOPS = 8


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """Fields completions and chat share. Unknown fields are ignored, as OpenAI-compatible servers do;
    fields lorakit cannot honour (logprobs, echo, best_of > 1, ...) are refused by their types."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)  # validated into a list
    seed: int | None = Field(None, ge=0, lt=2**63)
    logprobs: Literal[False] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > _MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop must be up to {_MAX_STOPS} non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)  # None: 16, OpenAI's default for completions
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not (1 <= len(v) <= 8):
            raise ValueError("prompt must be a string or a list of 1 to 8 strings")
        return v


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AdapterLoad(BaseModel):
    """POST /v1/adapters: load the adapter directory ``path`` (inside --adapter-root) as ``name``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1)


class LoraAdapterLoad(BaseModel):
    """POST /v1/load_lora_adapter, vLLM's body: load ``lora_path`` (inside --adapter-root) as ``lora_name``."""

    model_config = ConfigDict(extra="ignore")  # vLLM ignores what it does not know (e.g. is_3d_lora_weight)

    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class LoraAdapterUnload(BaseModel):
    """POST /v1/unload_lora_adapter, vLLM's body (its optional ``lora_int_id`` is ignored)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)


# ---- answers ----------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def model_card(name: str, created: int, parent: str | None = None) -> dict:
    card = {"id": name, "object": "model", "created": created, "owned_by": "lorakit"}
    if parent is not None:
        card["parent"] = parent
    return card


def usage(events: list[Event], prompt_tokens: int) -> dict:
    completion = sum(e.completion_tokens for e in events)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict, finish_reason: str | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def envelope(rid: str, kind: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
            409: "conflict_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
