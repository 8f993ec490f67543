"""Typed results. Unknown fields are kept (extra="allow"): other OpenAI-compatible servers add some."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Model):
    cached_tokens: int = 0  # of prompt_tokens, how many the server took from its prefix cache


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class ChatMessage(_Model):
    role: str = "assistant"
    content: Optional[str] = None


class TopLogprob(_Model):
    token: str = ""
    logprob: float = 0.0
    bytes: Optional[list[int]] = None  # the token's own bytes (part of a character, for some)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)  # likeliest first


class ChoiceLogprobs(_Model):
    """One entry per generated token (ask with extra={"logprobs": True, "top_logprobs": N})."""

    content: Optional[list[TokenLogprob]] = None


class Choice(_Model):
    index: int = 0
    message: ChatMessage = Field(default_factory=ChatMessage)
    finish_reason: Optional[str] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletion(_Model):
    id: str = ""
    object: str = "chat.completion"
    created: Optional[int] = None
    model: Optional[str] = None
    choices: list[Choice] = Field(default_factory=list)
    usage: Optional[Usage] = None
    request_id: Optional[str] = None  # the x-request-id response header

    @property
    def text(self) -> str:
        """The first choice's answer ("" when there is none)."""
        return (self.choices[0].message.content or "") if self.choices else ""

    @property
    def finish_reason(self) -> Optional[str]:
        return self.choices[0].finish_reason if self.choices else None


# ---- streaming ------------------------------------------------------------------------------
class ChunkDelta(_Model):
    role: Optional[str] = None
    content: Optional[str] = None


class ChunkChoice(_Model):
    index: int = 0
    delta: ChunkDelta = Field(default_factory=ChunkDelta)
    finish_reason: Optional[str] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(_Model):
    """One `data:` event of a stream, as the server sent it."""

    id: str = ""
    object: str = "chat.completion.chunk"
    created: Optional[int] = None
    model: Optional[str] = None
    choices: list[ChunkChoice] = Field(default_factory=list)
    usage: Optional[Usage] = None


class StreamDelta(_Model):
    """What a stream yields: the new text of one chunk, and how and when the answer ended.

    `finish_reason` is set on the chunk that ends the answer; `usage` on the final chunk;
    `logprobs` on every chunk of a request that asked for them (its tokens' entries).
    """

    text: str = ""
    role: Optional[str] = None
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None
    logprobs: list[TokenLogprob] = Field(default_factory=list)
    index: int = 0
    id: str = ""
    request_id: Optional[str] = None


# ---- other endpoints ------------------------------------------------------------------------
class Model(_Model):
    id: str
    object: str = "model"
    created: Optional[int] = None
    owned_by: Optional[str] = None


class ModelList(_Model):
    object: str = "list"
    data: list[Model] = Field(default_factory=list)
    request_id: Optional[str] = None

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.data]


class Health(_Model):
    """GET /health: `ok` when the server answered 200 (every stage up; a saturated one reads "busy"), False on 503."""

    ok: bool
    status_code: int
    status: Optional[str] = None
    detail: dict[str, Any] = Field(default_factory=dict)
    request_id: Optional[str] = None
