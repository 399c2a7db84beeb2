"""Every name ddsmon writes into MLflow: metric, param and tag keys sanitised to MLflow's
characters and cut to its key length (unique by a short hash), values cut to its value
lengths, the fixed tags that identify a ddsmon run, and MLflow's batch limits
(:data:`LIMITS`)."""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path

__all__ = (
    "CHECKPOINT_METRIC",
    "DIRECTORY_ID_TAG",
    "DIRECTORY_TAG",
    "LIMITS",
    "NOTE_TAG",
    "OWNED_TAG",
    "directory_id",
    "event_tag_key",
    "failure_tag_key",
    "metric_key",
    "param_key",
    "truncate",
)

#: Tag marking runs ddsmon created (and so may set RUNNING / FINISHED).
OWNED_TAG = "ddsmon.owned"
#: Tag holding the watched directory's absolute path.
DIRECTORY_TAG = "ddsmon.directory"
#: Tag holding :func:`directory_id` of the watched directory (what a run is found by).
DIRECTORY_ID_TAG = "ddsmon.directory_id"
#: MLflow's run description (shown on the run's page).
NOTE_TAG = "mlflow.note.content"
#: The metric marking a checkpoint fully logged (``1`` at its step, sent last).
CHECKPOINT_METRIC = "dds/checkpoint"


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


def param_key(key: str) -> str:
    """A param key in MLflow's characters (``/`` and ``:`` replaced; spaces and the ends
    kept), length-limited."""
    return _fit(_BAD_CHARS.sub("_", key) or "_")


def failure_tag_key(filename: str) -> str:
    """``ddsmon.failure.<file name>``, the tag of a checkpoint that could not be read."""
    return _fit(f"ddsmon.failure.{_component(filename)}")


def truncate(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, ending in ``...`` when cut."""
    return value if len(value) <= limit else value[: limit - 3] + "..."


def directory_id(directory: Path | str) -> str:
    """The sha1 of a directory's absolute path: the value of :data:`DIRECTORY_ID_TAG`."""
    return hashlib.sha1(str(Path(directory).resolve()).encode()).hexdigest()
