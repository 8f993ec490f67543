"""build_app(config) -> serve.Application: the one import path for `popserve serve`,
`serve run popserve.service.app:build_app`, `serve deploy` and KubeRay's serveConfigV2."""
from __future__ import annotations

from typing import Union

from ray import serve

from .config import ServeConfig
from .deployments.common import deployment_options
from .deployments.decode import DecodeStage
from .deployments.encoder import VisionEncoderStage
from .deployments.prefill import PrefillStage
from .ingress import Ingress
from .routing import ROUTER_CLASS


def build_app(args: Union[ServeConfig, dict, None] = None) -> serve.Application:
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args or {})
    cfg = cfg.resolved()
    c = cfg.model_dump()
    encoder = VisionEncoderStage.options(**deployment_options("VisionEncoder", cfg.encoder, cfg)).bind(c)
    prefill = PrefillStage.options(**prefill_options("Prefill", cfg.prefill, cfg)).bind(c, cfg.pop_ratio, "prefill")
    prefill_full = None
    if cfg.pop_off_prefill and cfg.pop_ratio > 0:
        prefill_full = PrefillStage.options(**prefill_options("PrefillFull", cfg.stage("prefill_full"), cfg)).bind(
            c, 0.0, "prefill_full")
    elif cfg.pop_ratio == 0:
        prefill_full = prefill  # POP is off anyway: the same replicas serve "pop": false
    decode = DecodeStage.options(**deployment_options("Decode", cfg.decode, cfg)).bind(c, prefill, prefill_full)
    return Ingress.options(**deployment_options("Ingress", cfg.ingress, cfg)).bind(
        c, encoder, prefill, prefill_full, decode)


def prefill_options(name: str, settings, cfg: ServeConfig) -> dict:
    opts = deployment_options(name, settings, cfg)
    if cfg.prefix_cache_bytes:  # prompts that start alike go to the replica that has them cached
        opts["request_router_config"] = {"request_router_class": ROUTER_CLASS}
    return opts
