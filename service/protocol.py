"""The OpenAI chat-completions wire format (the subset popserve serves), validated by pydantic."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from popserve.models.sampling import GENERATION_CONFIG_FIELDS

MAX_LOGIT_BIAS = 300  # entries in one request
MAX_CHOICES = 16


class ImageURL(BaseModel):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


# Tagged by "type", so that a part of another type gets one clear error instead of one per kind.
ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart]]
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _string_or_parts(cls, v):
        if not isinstance(v, (str, list)):
            raise ValueError("content must be a string or a list of parts ({type: text, text} or "
                             "{type: image_url, image_url: {url}})")
        return v

    @field_validator("content")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("content must not be an empty list")
        return v


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI parameters this server does not implement, with the values that ask for nothing: a
# request that sets one to anything else is refused rather than answered without it.
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
               "prediction": (None,), "audio": (None,), "modalities": (None, ["text"])}


def unsupported_parameter(data: dict) -> Optional[str]:
    """The first parameter in a request body that asks for something this server does not do."""
    return next((name for name, harmless in UNSUPPORTED.items() if name in data and data[name] not in harmless), None)


def describe(exc: ValidationError) -> tuple[str, str]:
    """(where, what) of a validation error, for a 400: the deepest error (the one inside a list of
    content parts rather than "not a string"), with pydantic's union-branch names left out."""
    err = max(exc.errors(), key=lambda e: len(e["loc"]))
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p == "str"))]
    loc = [p for i, p in enumerate(loc) if loc[i + 1:i + 2] != [p]]  # a part's tag, then its field of that name
    return ".".join(map(str, loc)), err["msg"].removeprefix("Value error, ")


class ChatCompletionRequest(BaseModel):
    # Unknown fields are ignored (OpenAI adds new ones often); the known ones are typed strictly
    # ("stream": "yes" is an error, not True), and null means the default, as in OpenAI's API.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension (vLLM-style)
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # extension (vLLM-style)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)  # extension (vLLM-style); counts the prompt too
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    stop: Optional[Union[str, list[str]]] = Field(default_factory=list)
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices decoded from one prefill
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    pop: bool = True  # popserve extension: False runs full-depth prefill (A/B checks)
    # vLLM's extension: prompts reuse cached KV only from prompts with the same salt, so that one
    # tenant cannot time another's prompts (docs/reliability.md).
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=256)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS)  # token id -> bias
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    # vLLM's extensions, which benchmark tools send for answers of a fixed length
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=16)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k == "model"}

    @field_validator("stop", mode="before")
    @classmethod
    def _string_or_strings(cls, v):
        if not isinstance(v, (str, list)):
            raise ValueError("stop must be a string or a list of strings")
        return v

    @field_validator("stop", mode="after")
    @classmethod
    def _stops(cls, v) -> list[str]:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _token_ids_and_biases(cls, v: dict[str, float]) -> dict[str, float]:
        for key, bias in v.items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias keys must be token ids, not {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], not {bias}")
        return v

    @field_validator("top_logprobs", mode="after")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, v: Optional[int], info):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @model_validator(mode="after")
    def _has_user_content(self):
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be from the assistant")
        return self

    def sampling(self, defaults: dict) -> dict:
        """temperature, top_p, top_k, min_p and repetition_penalty: the request's where it sets
        them (null is unset), else `defaults` (the model's generation_config.json), else OpenAI's."""
        return {name: getattr(self, name) if name in self.model_fields_set else defaults.get(name, getattr(self, name))
                for name in GENERATION_CONFIG_FIELDS}

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefill's prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> "Usage":
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Optional[Literal["stop", "length"]]
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[Literal["stop", "length"]] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "popserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
