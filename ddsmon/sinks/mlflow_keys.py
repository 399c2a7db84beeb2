"""MLflow metric and tag names: sanitised, within MLflow's key length and batch limits."""

from __future__ import annotations

import contextlib
import hashlib
import re

__all__ = ("LIMITS", "event_tag_key", "metric_key")


def _limits() -> dict[str, int]:
    """MLflow's batch and length limits, from mlflow where it exposes them."""
    out = {
        "metrics": 1000,
        "params_tags": 100,
        "entities": 1000,
        "param_value": 500,
        "tag_value": 5000,
        "key": 250,
    }
    with contextlib.suppress(ImportError):
        from mlflow.utils import validation as v

        out["metrics"] = getattr(v, "MAX_METRICS_PER_BATCH", out["metrics"])
        out["params_tags"] = getattr(v, "MAX_PARAMS_TAGS_PER_BATCH", out["params_tags"])
        out["entities"] = getattr(v, "MAX_ENTITIES_PER_BATCH", out["entities"])
        out["param_value"] = getattr(v, "MAX_PARAM_VAL_LENGTH", out["param_value"])
        out["tag_value"] = getattr(v, "MAX_TAG_VAL_LENGTH", out["tag_value"])
        out["key"] = getattr(v, "MAX_ENTITY_KEY_LENGTH", out["key"])
    return out


LIMITS = _limits()


_BAD_CHARS = re.compile(r"[^\w.\- ]")


def _component(name: str) -> str:
    """One path component of a metric or tag key in MLflow's allowed characters
    (alphanumerics, ``_ - . space``; ``/`` and ``:`` are replaced too)."""
    out = _BAD_CHARS.sub("_", name).strip() or "model"
    if out in (".", ".."):
        out = "_" + out
    return out


def _fit(key: str, limit: int | None = None) -> str:
    """Cut a key to MLflow's length limit, keeping it unique with a short hash."""
    limit = limit or LIMITS["key"]
    if len(key) <= limit:
        return key
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return key[: limit - 11] + "-" + digest


def metric_key(*parts: str) -> str:
    """``dds/<layer>/<reading>``-style key from raw parts, sanitised and length-limited."""
    return _fit("/".join(_component(p) for p in parts))


def event_tag_key(step: int, layer: str, kind: str) -> str:
    """``dds.event.<step>.<layer>.<kind>`` (layer dots kept; other characters sanitised)."""
    return _fit(f"dds.event.{int(step)}.{_component(layer)}.{_component(kind)}")


def _cut(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."
