"""popserve-chat: ask a popserve server one question, optionally about images, from a shell."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .client import Client
from .errors import PopserveError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="popserve-chat",
        description="Ask a popserve (or other OpenAI-compatible) server a question and print the answer.",
        epilog="POPSERVE_BASE_URL and POPSERVE_API_KEY are used when --base-url / --api-key are not given.",
    )
    p.add_argument("question", help="the text of the user message")
    p.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                   help="an image file or http(s) URL to ask about (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--base-url", help="server URL (default: $POPSERVE_BASE_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="API key (default: $POPSERVE_API_KEY)")
    p.add_argument("--model", help="model name (default: the first model the server lists)")
    p.add_argument("--max-tokens", type=int, help="most tokens to generate")
    p.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--no-pop", action="store_true", help="ask the server to turn its pruning off")
    p.add_argument("--image-max-side", type=int, metavar="PIXELS",
                   help="shrink local images to at most this many pixels a side before sending (needs Pillow)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="read timeout (default 300)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # Model output can hold characters the terminal's encoding lacks: replace, don't crash.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    request = dict(
        prompt=args.question,
        images=args.image or None,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        pop=False if args.no_pop else None,
        image_max_side=args.image_max_side,
    )
    printed = False  # whether a partial streamed answer is on the screen
    try:
        with Client(args.base_url, args.api_key, model=args.model, read_timeout=args.timeout) as client:
            if not args.stream:
                print(client.chat(**request).text)
                return 0
            with client.chat_stream(**request) as stream:
                for delta in stream:
                    if delta.text:
                        sys.stdout.write(delta.text)
                        sys.stdout.flush()
                        printed = True
            sys.stdout.write("\n")
            return 0
    except (PopserveError, OSError, ValueError, ImportError) as exc:
        # OSError/ValueError/ImportError: an unreadable image file, a bad argument, no Pillow.
        if printed:
            sys.stdout.write("\n")
            sys.stdout.flush()
        print(f"popserve-chat: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
