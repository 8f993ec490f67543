"""Server-sent events: turn response lines into the `data` payload of each event.

Only `data:` fields matter to the OpenAI stream format; comments (`: keep-alive`) and the
`event:`, `id:` and `retry:` fields are skipped.
"""
from __future__ import annotations

from typing import AsyncIterable, AsyncIterator, Iterable, Iterator, Optional


class SSEDecoder:
    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> Optional[str]:
        """Take one line (without its line ending); return an event's data when a blank line ends it."""
        if line == "":
            return self.flush()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> Optional[str]:
        """The pending event, if any: also called at the end of the body, for servers that
        omit the last blank line. A truncated event there fails to decode as JSON later."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    decoder = SSEDecoder()
    for line in lines:
        data = decoder.feed(line)
        if data is not None:
            yield data
    data = decoder.flush()
    if data is not None:
        yield data


async def aiter_sse_data(lines: AsyncIterable[str]) -> AsyncIterator[str]:
    decoder = SSEDecoder()
    async for line in lines:
        data = decoder.feed(line)
        if data is not None:
            yield data
    data = decoder.flush()
    if data is not None:
        yield data
