"""Ingress deployment: the OpenAI-compatible HTTP API (FastAPI inside Ray Serve).

It validates, loads images, applies the chat template, then wires the stages together by
reference: encoder features and the KV handoff travel replica to replica through Ray's object
store as DeploymentResponses; this process only ever sees token ids coming back.
"""

import asyncio
import os
import hmac
import json
import logging
import time
import uuid
from typing import AsyncIterator, Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import ValidationError
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

from popserve.models.prompt import Prompt, PromptBuilder
from popserve.models.sampling import SamplingParams

from .config import ServeConfig
from .deployments.common import replica_info, setup_replica
from .engine.detokenize import Detokenizer, TokenPieces
from .engine.scheduler import TokenEvent
from .errors import (BadRequest, NotFound, PayloadTooLarge, ServeError, StageFailed, Unauthorized, from_exception,
                     retry_replica_failures)
from .media import load_image
from .metrics import IngressMetrics, node_metrics_url, scrape_node
from .protocol import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChoiceLogprobs, ChunkChoice,
                       Delta, ModelCard, ModelList, ResponseMessage, TokenLogprob, TopLogprob, Usage, describe,
                       unsupported_parameter)

logger = logging.getLogger("ray.serve")
app = FastAPI(title="popserve", description="OpenAI-compatible chat completions with POP prefill")

# Temperatures this small sample like greedy anyway, but logits / t overflows float32 to inf and
# the softmax to NaN, which would fail the sampler and with it every sequence of the decode batch.
MIN_SAMPLING_TEMPERATURE = 1e-3


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (unknown path, wrong method) in OpenAI's shape too."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def api_keys(configured: list[str], environ) -> list[str]:
    """The config's keys plus POPSERVE_API_KEYS (comma-separated); empty: no auth."""
    env_keys = [k.strip() for k in environ.get("POPSERVE_API_KEYS", "").split(",") if k.strip()]
    return list(configured) + env_keys


def check_api_key(keys: list[str], path: str, authorization: str, protect_metrics: bool) -> None:
    """Raise Unauthorized unless the path is open or `Authorization: Bearer <key>` carries one of
    the keys. Compared in constant time against every key (no short-circuit on a match)."""
    if not keys or path.endswith("/health") or (path.endswith("/metrics") and not protect_metrics):
        return
    token = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
    ok = 0
    for key in keys:
        ok |= hmac.compare_digest(token.encode(), key.encode())
    if not ok:
        raise Unauthorized("missing or invalid API key (send Authorization: Bearer <key>)", code="invalid_api_key")


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    """`first`, then the rest of `rest`; closing it closes `rest` (and so frees the decode slot)."""
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


class SSEResponse(StreamingResponse):
    """When a client goes away, Serve's proxy cancels the request, and Serve's ASGI `receive`
    then raises TaskCancelledError inside Starlette's disconnect listener, which lets it escape
    (a "Task exception was never retrieved" traceback per disconnect). It is a disconnect: end
    the stream as Starlette does for one (the decode stream is closed, its KV freed)."""

    media_type = "text/event-stream"

    async def listen_for_disconnect(self, receive) -> None:
        try:
            await super().listen_for_disconnect(receive)
        except TaskCancelledError:
            pass


def build_prompt(builder: PromptBuilder, messages: list[dict], images: list) -> Prompt:
    """The prompt, or a 400 for what the chat template or processor refuses (a template's
    raise_exception, e.g. Gemma-3's "roles must alternate", is a TemplateError)."""
    try:
        return builder.build(messages, images)
    except (ValueError, TypeError, TemplateError) as exc:
        raise BadRequest(f"cannot build the prompt: {exc}", param="messages", code="invalid_value") from None


def sampling_defaults(builder: PromptBuilder, source: str) -> dict:
    """The sampling values requests get for what they leave unset (ServeConfig.sampling_defaults),
    over OpenAI's. A checkpoint's out-of-range value fails the start, not every request."""
    if source == "openai" or not builder.sampling_defaults:
        return {}
    try:
        SamplingParams(**builder.sampling_defaults)
    except ValueError as exc:
        raise ValueError(f"the model's generation_config.json: {exc} (sampling_defaults: openai ignores it)") from None
    logger.info("sampling defaults from the model's generation_config.json: %s", builder.sampling_defaults)
    return dict(builder.sampling_defaults)


def _healthy_in_serve(stages: dict) -> set[str]:
    """The stages whose deployments Serve's controller reports healthy (their replicas pass
    Serve's own health checks)."""
    from ray.serve.schema import DeploymentStatus

    up = {DeploymentStatus.HEALTHY, DeploymentStatus.UPSCALING, DeploymentStatus.DOWNSCALING}
    try:
        apps = serve.status().applications
    except Exception:  # the controller itself unreachable: nothing is known to be up
        return set()
    deployments = {name: apps[h.app_name].deployments.get(h.deployment_name) if h.app_name in apps else None
                   for name, h in stages.items()}
    return {name for name, d in deployments.items() if d is not None and d.status in up}


def _cached_tokens(items: list[TokenEvent], known: int) -> int:
    """Decode's first token also carries how many prompt tokens the prefill's cache supplied."""
    return known if items[0].cached_tokens is None else items[0].cached_tokens


class _Choices:
    """A request's n choices at the Ingress: decode's events, grouped by choice, through one
    detokenizer each (stop strings, held-back text), with their token counts, finish reasons and
    logprobs entries. A choice that ended here (a stop string) ignores what decode still sends."""

    def __init__(self, tokenizer, req: ChatCompletionRequest, logprobs_of):
        self.logprobs_of = logprobs_of  # TokenEvents -> their logprobs entries (Ingress._logprobs)
        self.detoks = [Detokenizer(tokenizer, req.stop, req.min_tokens) for _ in range(req.n)]
        self.counts = [0] * req.n
        self.reasons: list[Optional[str]] = [None] * req.n
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(req.n)]

    @property
    def done(self) -> bool:
        return all(self.reasons)

    def feed(self, items: list[TokenEvent]) -> list[tuple[int, str, list[TokenLogprob], Optional[str]]]:
        """(choice, new text, its tokens' logprobs entries, finish reason or None) per choice."""
        out = []
        for index in dict.fromkeys(e.index for e in items):
            if self.reasons[index]:
                continue
            events = [e for e in items if e.index == index]
            text, used, self.reasons[index] = self.detoks[index].feed_message(events)
            self.counts[index] += used
            logprobs = self.logprobs_of(events[:used])
            self.logprobs[index] += logprobs
            out.append((index, text, logprobs, self.reasons[index]))
        return out


def _request_id() -> str:
    """Serve gives every request an id (the client's x-request-id header when sent) and echoes
    it in the response's x-request-id header; logs carry it too."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or uuid.uuid4().hex


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, cfg: dict, encoder, prefill, prefill_full, decode):
        self.cfg = ServeConfig.model_validate(cfg)
        # Keys may also come from the environment (e.g. a Kubernetes Secret), never logged.
        self.cfg.api_keys = api_keys(self.cfg.api_keys, os.environ)
        setup_replica(self.cfg, self.cfg.ingress)  # torch threads (the image processor) and nice
        self.encoder, self.prefill, self.prefill_full, self.decode = encoder, prefill, prefill_full, decode
        self.builder = PromptBuilder(self.cfg.model)
        self.pieces = TokenPieces(self.builder.tokenizer)
        self.sampling_defaults = sampling_defaults(self.builder, self.cfg.sampling_defaults)
        self.model_name = self.cfg.model_name()
        text_cfg = self.builder.family.text_config
        self.max_context = min(self.cfg.engine.max_seq_len, text_cfg.max_position_embeddings)
        # Prompt + at least one new token fit the context; limits.max_prompt_tokens caps the prompt alone.
        self.max_prompt = min(self.max_context - 1, self.cfg.limits.max_prompt_tokens or 1 << 30)
        self.metrics = IngressMetrics()
        self.app_name = serve.get_replica_context().app_name
        self.metrics_url = node_metrics_url()
        self.created = int(time.time())

    # ---- cross-cutting ---------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        """API keys (if configured) guard the API. /health stays open for probes; /metrics is
        open unless protect_metrics is set (see docs/reliability.md)."""
        check_api_key(self.cfg.api_keys, request.url.path, request.headers.get("authorization", ""),
                      self.cfg.protect_metrics)

    def _auth_headers(self, exc: ServeError) -> dict:
        return {"www-authenticate": "Bearer"} if isinstance(exc, Unauthorized) else {}

    def error_response(self, exc: ServeError, rid: str) -> JSONResponse:
        self.metrics.request_done(exc.status, exc.code or exc.type)
        headers = self._auth_headers(exc)
        if exc.retry_after is not None:
            headers["retry-after"] = str(max(1, round(exc.retry_after)))
        if exc.status >= 500:
            logger.error("request %s failed: %s", rid, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    # ---- routes ----------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self.authorize(request)
        except ServeError as exc:
            return self.error_response(exc, _request_id())
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created)])

    @app.get("/v1/models/{model_id:path}")  # a hub id has a slash in it
    async def model(self, model_id: str, request: Request):
        try:
            self.authorize(request)
            self.check_model(model_id)
        except ServeError as exc:
            return self.error_response(exc, _request_id())
        return ModelCard(id=self.model_name, created=self.created)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise NotFound(f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def stats(self) -> dict:
        """This replica's process and thread layout, as every stage reports it."""
        return replica_info()

    def _stages(self) -> dict:
        stages = {"encoder": self.encoder, "prefill": self.prefill, "decode": self.decode}
        if self.prefill_full is not None:
            stages["prefill_full"] = self.prefill_full
        return stages

    @app.get("/health")
    async def health(self):
        """200 when every stage is up. ready() goes through Serve's queues, so a stage that does
        not answer in time may only be saturated: then Serve's own health checks, which do not
        queue behind requests, decide ("busy": up, its queue full)."""
        stages = self._stages()
        results = await asyncio.gather(
            *(asyncio.wait_for(h.ready.remote(), timeout=5.0) for h in stages.values()), return_exceptions=True)
        status = {name: r is True for name, r in zip(stages, results)}
        if not all(status.values()):
            healthy = await asyncio.to_thread(_healthy_in_serve, stages)
            status = {name: up or ("busy" if name in healthy else False) for name, up in status.items()}
        code = 200 if all(status.values()) else 503
        return JSONResponse({"status": "ok" if code == 200 else "unavailable", "stages": status}, status_code=code)

    @app.get("/metrics")
    async def metrics(self, request: Request):
        try:
            self.authorize(request)
        except ServeError as exc:
            return self.error_response(exc, _request_id())
        try:
            text = await scrape_node(self.metrics_url, self.app_name)
        except httpx.HTTPError as exc:
            failed = StageFailed(f"Ray's metrics agent did not answer: {exc}", code="metrics_unavailable")
            return self.error_response(failed, _request_id())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        rid = _request_id()
        t0 = time.perf_counter()
        try:
            self.authorize(request)
            req = await self._parse(request)
            prepared = await self._prepare(req)
            self.metrics.phase.observe(time.perf_counter() - t0, tags={"stage": "prepare"})
        except ServeError as exc:
            return self.error_response(exc, rid)
        except Exception as exc:  # a bug, not the client's fault
            logger.exception("request %s: unexpected error while preparing", rid)
            return self.error_response(from_exception(exc), rid)
        try:
            tokens = await self._start(req, prepared, rid, t0)
        except ServeError as exc:
            return self.error_response(exc, rid)
        except Exception as exc:
            logger.exception("request %s failed before its first token", rid)
            return self.error_response(from_exception(exc), rid)
        if req.stream:
            return SSEResponse(self._sse(req, prepared, tokens, rid, t0), headers={"cache-control": "no-cache"})
        try:
            return await self._complete(req, prepared, tokens, rid, t0)
        except ServeError as exc:
            return self.error_response(exc, rid)
        except Exception as exc:
            logger.exception("request %s failed", rid)
            return self.error_response(from_exception(exc), rid)

    # ---- request handling ------------------------------------------------------------------
    async def _parse(self, request: Request) -> ChatCompletionRequest:
        cap = self.cfg.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds {cap}", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise PayloadTooLarge(f"request body exceeds {cap} bytes", code="request_too_large")
        try:
            data = json.loads(body, parse_constant=_no_constant)
        except RecursionError:
            raise BadRequest("request body is nested too deeply", code="invalid_json") from None
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, NaN/Infinity, huge integers
            raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object", code="invalid_json")
        unsupported = unsupported_parameter(data)
        if unsupported:
            raise BadRequest(f"{unsupported} is not supported by this server", param=unsupported,
                             code="unsupported_parameter")
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as exc:
            loc, msg = describe(exc)
            raise BadRequest(f"{loc}: {msg}" if loc else msg, param=loc or None, code="invalid_value") from None
        self.check_model(req.model)
        if not req.pop and self.prefill_full is None:
            raise BadRequest("pop=false is disabled on this server (pop_off_prefill: false)", param="pop")
        return req

    async def _prepare(self, req: ChatCompletionRequest) -> dict:
        lim = self.cfg.limits
        urls, messages, texts = [], [], []
        for m in req.messages:
            if isinstance(m.content, str):
                messages.append({"role": m.role, "content": m.content})
                texts.append(m.content)
                continue
            parts = []
            for p in m.content:
                if p.type == "text":
                    parts.append({"type": "text", "text": p.text})
                    texts.append(p.text)
                else:
                    urls.append(p.image_url.url)
                    parts.append({"type": "image"})
            messages.append({"role": m.role, "content": parts})
        for text in texts:
            if (token := self.builder.control_token_in(text)) is not None:
                raise BadRequest(f"message text contains the model's control token {token!r}", param="messages",
                                 code="invalid_value")
        if (least := self.builder.min_tokens(texts)) > self.max_prompt:  # before spending a core on it
            raise BadRequest(f"prompt is at least {least} tokens; {self._prompt_limit()}", param="messages",
                             code="context_length_exceeded")
        if len(urls) > lim.max_images_per_request:
            raise BadRequest(f"{len(urls)} images; at most {lim.max_images_per_request} per request",
                             param="messages", code="too_many_images")
        images = await asyncio.gather(*(load_image(u, self.cfg.media, lim) for u in urls))
        prompt = await asyncio.to_thread(build_prompt, self.builder, messages, [i.image for i in images])
        n = prompt.num_tokens
        if n > self.max_prompt:
            raise BadRequest(f"prompt is {n} tokens; {self._prompt_limit()}", param="messages",
                             code="context_length_exceeded")
        asked = req.requested_max_tokens()
        if asked is not None and asked > lim.max_tokens_limit:
            raise BadRequest(f"max_tokens {asked} exceeds this server's limit {lim.max_tokens_limit}",
                             param="max_tokens", code="invalid_value")
        max_tokens = asked or min(lim.max_tokens_default, self.max_context - n)
        if n + max_tokens > self.max_context:
            raise BadRequest(f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the context length "
                             f"{self.max_context}", param="max_tokens", code="context_length_exceeded")
        sampling = req.sampling(self.sampling_defaults)
        if sampling["temperature"] < MIN_SAMPLING_TEMPERATURE:  # documented
            sampling["temperature"] = 0.0
        bias = {int(k): v for k, v in req.logit_bias.items()}
        vocab = len(self.builder.tokenizer)
        for param, ids in (("logit_bias", bias), ("stop_token_ids", req.stop_token_ids)):
            if ids and max(ids) >= vocab:
                raise BadRequest(f"{param} names token {max(ids)}; the vocabulary has {vocab}", param=param,
                                 code="invalid_value")
        if req.n > self.cfg.engine.max_running_seqs:
            raise BadRequest(f"n {req.n} exceeds the sequences decode runs at once ({self.cfg.engine.max_running_seqs})",
                             param="n", code="invalid_value")
        if req.min_tokens > max_tokens:
            raise BadRequest(f"min_tokens {req.min_tokens} exceeds max_tokens {max_tokens}", param="min_tokens",
                             code="invalid_value")
        params = {"max_new_tokens": max_tokens, **sampling, "seed": req.seed, "presence_penalty": req.presence_penalty,
                  "frequency_penalty": req.frequency_penalty, "logit_bias": bias,
                  "logprobs": (req.top_logprobs or 0) if req.logprobs else None,
                  "min_tokens": req.min_tokens, "ignore_eos": req.ignore_eos,
                  "stop_token_ids": tuple(req.stop_token_ids)}
        return {"prompt": prompt, "digests": [i.digest for i in images], "params": params}

    def _logprobs(self, items: list[TokenEvent]) -> list[TokenLogprob]:
        """OpenAI's logprobs entries of these tokens (none when the request did not ask)."""
        def entry(token_id: int, logprob: float) -> dict:
            text, raw = self.pieces(token_id)
            return {"token": text, "bytes": raw, "logprob": logprob}

        if not items or items[0].logprobs is None:
            return []
        return [TokenLogprob(**entry(e.token_id, e.logprobs.logprob),
                             top_logprobs=[TopLogprob(**entry(i, lp)) for i, lp in e.logprobs.top]) for e in items]

    def _prompt_limit(self) -> str:
        if self.max_prompt < self.max_context - 1:
            return f"this server takes at most {self.max_prompt} prompt tokens (limits.max_prompt_tokens)"
        return f"the context length is {self.max_context}"

    def _launch(self, req: ChatCompletionRequest, prepared: dict):
        """Wire the stages by reference; nothing big comes back through this process. Decode
        asks Prefill for the KV itself (so that it can free the handoff once it holds the KV)."""
        prompt = prepared["prompt"]
        features = None
        if prompt.pixels:
            features = self.encoder.encode.remote(list(zip(prepared["digests"], prompt.pixels)))
        return self.decode.options(stream=True).generate.remote(
            prompt.input_ids, prompt.mm_token_type_ids, features, prepared["params"], req.pop, req.cache_salt, req.n,
            tuple(req.stop))

    async def _start(self, req, prepared, rid, t0) -> AsyncIterator[list[tuple[int, Optional[str]]]]:
        """Launch the stages and wait for the first token before answering, so that whatever fails
        before it (a full queue, a dead replica, a timeout) comes back as an HTTP status, streaming
        or not. A replica failure before the first token is retried: nothing was produced yet and
        encode, prefill and decode are idempotent (the retry may land on another replica, or on
        the restarted one). A replica killed a moment ago can still be in the router's list, so
        each retry waits a little longer first."""
        deadline = time.monotonic() + self.cfg.limits.request_timeout_s  # all attempts share it

        async def attempt():
            first_timeout = max(0.001, deadline - time.monotonic())
            tokens = self._tokens(self._launch(req, prepared), req, prepared, rid, t0, first_timeout)
            try:
                first = await tokens.__anext__()
            except StopAsyncIteration:
                return tokens
            except BaseException:
                await tokens.aclose()
                raise
            return _prepend(first, tokens)

        return await retry_replica_failures(attempt, f"request {rid}", deadline)

    async def _tokens(self, stream, req, prepared, rid, t0,
                      first_timeout: Optional[float] = None) -> AsyncIterator[list[tuple[int, Optional[str]]]]:
        """Token ids from decode as they arrive, a list of (token id, finish reason) per message
        (several when decode ran ahead of this process), with TTFT / ITL metrics and a timeout
        (limits.request_timeout_s: the longest wait for the first token, then for each next one)."""
        timeout = first_timeout or self.cfg.limits.request_timeout_s
        first, last, launched = True, None, time.perf_counter()
        self.metrics.in_flight(+1)
        try:
            while True:
                try:
                    items = await asyncio.wait_for(stream.__anext__(), timeout)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise from_exception(TimeoutError()) from None
                except ServeError:
                    raise
                except Exception as exc:
                    raise from_exception(exc) from None
                now = time.perf_counter()
                if first:
                    self.metrics.ttft.observe(now - t0, tags={"pop": str(req.pop).lower()})
                    self.metrics.phase.observe(now - launched, tags={"stage": "first_token"})
                    first = False
                    timeout = self.cfg.limits.request_timeout_s
                elif last is not None:
                    self.metrics.itl.observe((now - last) / len(items))
                last = now
                yield items
        finally:
            self.metrics.in_flight(-1)
            try:
                stream.cancel()  # no-op when finished; frees the decode slot when the client left
            except Exception:  # cancel() re-raises a failed routing (a dead replica): nothing to free,
                pass  # and the error being handled (retried or answered) must not be replaced by it

    def _finish_metrics(self, prepared, completion_tokens, t0):
        self.metrics.request_done(200)
        self.metrics.e2e.observe(time.perf_counter() - t0)
        self.metrics.prompt_tokens.inc(prepared["prompt"].num_tokens)
        self.metrics.completion_tokens.inc(completion_tokens)

    async def _complete(self, req, prepared, tokens, rid, t0) -> JSONResponse:
        choices, cached = _Choices(self.builder.tokenizer, req, self._logprobs), 0
        try:
            async for items in tokens:
                cached = _cached_tokens(items, cached)
                choices.feed(items)  # the text accumulates in each choice's detokenizer
                if choices.done:
                    break
        finally:  # also when the client went away (the task is cancelled): frees the decode slot
            await tokens.aclose()
        n = prepared["prompt"].num_tokens
        self._finish_metrics(prepared, sum(choices.counts), t0)
        body = ChatCompletion(
            id=f"chatcmpl-{rid}", created=int(time.time()), model=self.model_name,
            choices=[Choice(index=i, message=ResponseMessage(content=d.text), finish_reason=choices.reasons[i] or "length",
                            logprobs=ChoiceLogprobs(content=choices.logprobs[i]) if req.logprobs else None)
                     for i, d in enumerate(choices.detoks)],
            usage=Usage.of(n, sum(choices.counts), cached),
        )
        return JSONResponse(body.model_dump())

    async def _sse(self, req, prepared, tokens, rid, t0) -> AsyncIterator[str]:
        created, cid = int(time.time()), f"chatcmpl-{rid}"

        def chunk(delta: Delta, index=0, reason=None, usage=None, choices=True, logprobs=None) -> str:
            choice = ChunkChoice(index=index, delta=delta, finish_reason=reason, logprobs=logprobs)
            c = ChatCompletionChunk(id=cid, created=created, model=self.model_name, usage=usage,
                                    choices=[choice] if choices else [])
            return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

        choices, cached = _Choices(self.builder.tokenizer, req, self._logprobs), 0
        for index in range(req.n):
            yield chunk(Delta(role="assistant", content=""), index)
        try:
            async for items in tokens:
                cached = _cached_tokens(items, cached)
                # One event per choice for the tokens that arrived together: every event is a
                # message to Serve's proxy and a write to the socket (docs/performance.md).
                for index, text, logprobs, reason in choices.feed(items):
                    if text or logprobs:  # a token whose text is held back still has its logprob
                        yield chunk(Delta(content=text), index,
                                    logprobs=ChoiceLogprobs(content=logprobs) if logprobs else None)
                    if reason:
                        yield chunk(Delta(), index, reason=reason)
                if choices.done:
                    break
        except ServeError as exc:  # mid-stream failure: an error event, and no [DONE]
            self.metrics.request_done(exc.status, exc.code or exc.type)
            yield f"data: {json.dumps(exc.body())}\n\n"
            return
        finally:  # also when the client went away (the task is cancelled): frees the decode slot
            await tokens.aclose()
        n = prepared["prompt"].num_tokens
        self._finish_metrics(prepared, sum(choices.counts), t0)
        for index, reason in enumerate(choices.reasons):
            if reason is None:  # decode's stream ended without saying (cannot happen normally)
                yield chunk(Delta(), index, reason="length")
        if req.stream_options and req.stream_options.include_usage:
            yield chunk(Delta(), usage=Usage.of(n, sum(choices.counts), cached), choices=False)
        yield "data: [DONE]\n\n"

