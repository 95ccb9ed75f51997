"""Plugins from the config: built-in ones by name, others by ``package.module:Class``, each
built from its own checked options, in an order that keeps the cache honest.
"""

from __future__ import annotations

import importlib

from gateway.config import GatewayConfig, PluginConfig
from gateway.typed_toml import ConfigError, build
from plugins.base import Plugin

BUILTIN = {"safety": "plugins.safety:SafetyPlugin", "cache": "plugins.cache:CachePlugin",
           "qa": "plugins.qa:QualityPlugin"}


def load_plugins(config: GatewayConfig) -> list[Plugin]:
    """The configured plugins, each built from its own checked options; each name once
    (a plugin keeps what it knows of a request under its name: a second of the same name
    would overwrite the first's, a cache's mark of a request in flight left for ever).
    """
    names = [spec.name for spec in config.plugins]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{config.source}: plugins[{i}].name: {name!r} is already the "
                              "name of a plugin; give each its own (name = ..., with path = "
                              "for a second of the same kind)")
    _check_order(config)
    return [_load(spec, config.source, f"plugins[{i}]")
            for i, spec in enumerate(config.plugins)]


def _check_order(config: GatewayConfig) -> None:
    """The cache keeps what the plugins before it let through: it must come after the safety
    checker (whose redacted request it keys, and whose blocks a hit would skip) and after
    quality assurance (whose rejected answers it must not keep).
    """
    paths = [spec.path or BUILTIN.get(spec.name) for spec in config.plugins]
    if BUILTIN["cache"] not in paths:
        return
    cache = paths.index(BUILTIN["cache"])
    for name in ("safety", "qa"):
        if BUILTIN[name] in paths[cache:]:
            raise ConfigError(f"{config.source}: plugins: {name} must come before cache "
                              f"(the cache keeps only what {name} let through)")


def _load(spec: PluginConfig, source: str, where: str) -> Plugin:
    path = spec.path or BUILTIN.get(spec.name)
    if path is None:
        raise ConfigError(f"{source}: {where}.name: no built-in plugin {spec.name!r} "
                          f"(built-in: {', '.join(BUILTIN)}; others need a path)")
    module, _, attribute = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{source}: {where}.path: cannot load {path}: {exc}") from None
    options_type = getattr(cls, "Options", None)
    options = build(options_type, spec.options, source, f"{where}.options") \
        if options_type is not None else spec.options
    plugin: Plugin = cls(options)
    plugin.name = spec.name
    return plugin

