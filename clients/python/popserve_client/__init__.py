"""popserve_client: a small Python client for popserve and other OpenAI-compatible chat servers.

Depends only on httpx and pydantic; Pillow is optional (PIL images, client-side downscaling).
"""
from ._retry import RetryPolicy
from ._stream import AsyncChatStream, ChatStream
from ._version import __version__
from .client import DEFAULT_BASE_URL, AsyncClient, Client
from .errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    IncompleteStreamError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PopserveError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from .images import image_part, image_url
from .types import (
    ChatCompletion,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    Health,
    Model,
    ModelList,
    PromptTokensDetails,
    StreamDelta,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    "__version__",
    "DEFAULT_BASE_URL",
    "Client",
    "AsyncClient",
    "ChatStream",
    "AsyncChatStream",
    "RetryPolicy",
    "image_part",
    "image_url",
    "ChatCompletion",
    "ChatMessage",
    "Choice",
    "Usage",
    "PromptTokensDetails",
    "ChoiceLogprobs",
    "TokenLogprob",
    "TopLogprob",
    "StreamDelta",
    "Model",
    "ModelList",
    "Health",
    "PopserveError",
    "APIConnectionError",
    "APITimeoutError",
    "IncompleteStreamError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
    "ServiceUnavailableError",
]
