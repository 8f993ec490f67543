"""The JSON body of POST /v1/chat/completions, from the keyword arguments of chat()."""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional, Sequence, Union

from .images import ImageSource, image_part

Message = Mapping[str, Any]  # OpenAI format: {"role": ..., "content": str | list of parts}


def prompt_messages(
    prompt: str, images: Optional[Sequence[ImageSource]] = None, max_side: Optional[int] = None
) -> list[dict[str, Any]]:
    """One user message: the images first (as most VLM chat templates expect), then the text."""
    if not images:
        return [{"role": "user", "content": prompt}]
    parts = [image_part(image, max_side) for image in images]
    parts.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": parts}]


def chat_body(
    *,
    model: str,
    messages: Optional[Sequence[Message]],
    prompt: Optional[str],
    images: Optional[Sequence[ImageSource]],
    max_tokens: Optional[int],
    temperature: Optional[float],
    top_p: Optional[float],
    seed: Optional[int],
    presence_penalty: Optional[float],
    frequency_penalty: Optional[float],
    logit_bias: Optional[Mapping[int, float]],
    logprobs: Optional[bool],
    top_logprobs: Optional[int],
    stop: Union[str, Sequence[str], None],
    pop: Optional[bool],
    extra: Optional[Mapping[str, Any]],
    stream: bool,
    image_max_side: Optional[int],
) -> dict[str, Any]:
    if (messages is None) == (prompt is None):
        raise ValueError("pass either messages=[...] or prompt='...', not both")
    if messages is not None:
        if images:
            raise ValueError("images= goes with prompt=; with messages=, put image_url parts in the messages")
        if isinstance(messages, (str, bytes)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        msgs = [copy.deepcopy(dict(m)) for m in messages]
    else:
        msgs = prompt_messages(prompt, images, image_max_side)  # type: ignore[arg-type]

    body: dict[str, Any] = {"model": model, "messages": msgs}
    # Only what the caller set: the server's defaults apply to the rest.
    optional = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed, "pop": pop,
                "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty,
                "logprobs": logprobs, "top_logprobs": top_logprobs}
    body.update({k: v for k, v in optional.items() if v is not None})
    if logit_bias:  # JSON object keys are strings: {"1542": -100}
        body["logit_bias"] = {str(int(token)): float(bias) for token, bias in logit_bias.items()}
    if stop is not None:
        body["stop"] = stop if isinstance(stop, str) else list(stop)
    if stream:
        # Always ask for usage: the final chunk then says how many tokens were generated.
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    body.update(extra or {})  # passthrough last, so it can set anything the server knows
    return body
