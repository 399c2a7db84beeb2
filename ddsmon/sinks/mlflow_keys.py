"""Every name ddsmon writes into MLflow: metric, param and tag keys sanitised to MLflow's
characters and cut to its key length (unique by a short hash), values cut to its value
lengths, the fixed tags that identify a ddsmon run, and MLflow's batch limits
(:data:`LIMITS`).

Metric names are laid out for MLflow's chart view. The UI (MLflow 3, the run page's
"Model metrics" tab and the experiment's chart view alike) puts a chart in the section
named by its key up to the *last* ``/`` and titles the chart by the part after it; the
sections are sorted by name (a key with no ``/`` goes to "Model metrics", after them).
So the reading is the section and the layer the chart:

``dds/<reading>/<layer>`` (:data:`HEADLINE_PREFIX`)
    the headline readings (``Reading.headline``: scale-free ratios, ``log_volume``, dead
    counts, ...): one section per reading, one chart per layer, every layer of a reading
    side by side; they sort first.
``dds/events/<kind>``
    the largest magnitude of each event kind at a step: the section ``dds/events``, among
    the headline ones.
``dds_detail/<reading>/<layer>`` (:data:`DETAIL_PREFIX`)
    every other reading, the floors and ``finite``: below the headline sections
    (``"dds/" < "dds_"``), at hand in the chart search box.
``ddsmon/checkpoint``, ``ddsmon/load_seconds``, ``ddsmon/read_seconds``
    ddsmon's own bookkeeping (:data:`CHECKPOINT_METRIC`: the marker of a checkpoint
    fully logged; runs logged by earlier versions hold it as
    :data:`LEGACY_CHECKPOINT_METRIC`, still read).
``train/<key>``
    the trainer's scalars found in the checkpoint.

Cutting a key to MLflow's length keeps its start, so a long layer name loses its end
(made unique by a hash) and never its section.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = (
    "CHECKPOINT_METRIC",
    "CHECKPOINT_METRICS",
    "DETAIL_PREFIX",
    "DIRECTORY_ID_TAG",
    "DIRECTORY_TAG",
    "HEADLINE_PREFIX",
    "LEGACY_CHECKPOINT_METRIC",
    "LIMITS",
    "MODEL_TRAINING_QUERY",
    "NOTE_TAG",
    "OWNED_TAG",
    "directory_id",
    "event_tag_key",
    "event_tag_keys",
    "event_tag_value",
    "failure_tag_key",
    "metric_key",
    "param_key",
    "reading_metric_key",
    "review_url",
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
#: The metric marking a checkpoint fully logged (``1`` at its step, sent last): in
#: ddsmon's own section, out of the way of the readings.
CHECKPOINT_METRIC = "ddsmon/checkpoint"
#: The checkpoint marker's name in runs logged before it moved (read, never written).
LEGACY_CHECKPOINT_METRIC = "dds/checkpoint"
#: Every name a run's checkpoint marker may have: the steps a run holds are the union of
#: their histories.
CHECKPOINT_METRICS: tuple[str, ...] = (CHECKPOINT_METRIC, LEGACY_CHECKPOINT_METRIC)
#: The first part of the headline readings' keys (``dds/<reading>/<layer>``) and of
#: ``dds/events/<kind>``.
HEADLINE_PREFIX = "dds"
#: The first part of every other per-layer reading's key (``dds_detail/<reading>/<layer>``).
DETAIL_PREFIX = "dds_detail"


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


def reading_metric_key(layer: str, name: str) -> str:
    """The key of per-layer reading ``name``: ``dds/<name>/<layer>`` for a headline
    reading (:data:`~ddsmon.readings.HEADLINE_READINGS`), ``dds_detail/<name>/<layer>``
    for any other (the details, the floors, ``finite``)."""
    from ddsmon.readings import HEADLINE_READINGS

    prefix = HEADLINE_PREFIX if name in HEADLINE_READINGS else DETAIL_PREFIX
    return metric_key(prefix, name, layer)


def event_tag_key(step: int, layer: str, kind: str, *more: str) -> str:
    """``dds.event.<step>.<layer>.<kind>`` (layer dots kept; other characters sanitised),
    with ``.<part>`` for each of ``more``."""
    parts = [str(int(step)), _component(layer), _component(kind), *map(_component, more)]
    return _fit("dds.event." + ".".join(parts))


def event_tag_keys(events: Iterable[tuple[int, str, str, str]]) -> list[str]:
    """The tag key of each event ``(step, layer, kind, reading)`` of one checkpoint's
    batch, in order: :func:`event_tag_key`, and where an earlier event of the batch took
    it (two readings of one layer collapsing at one step) that key with ``.<reading>``
    after it (then ``.2``, ``.3``... if need be), so that no event's tag overwrites
    another's."""
    keys: list[str] = []
    taken: set[str] = set()
    for step, layer, kind, reading in events:
        key = event_tag_key(step, layer, kind)
        i = 2
        if key in taken:
            key = event_tag_key(step, layer, kind, reading)
        while key in taken:
            key, i = event_tag_key(step, layer, kind, reading, str(i)), i + 1
        taken.add(key)
        keys.append(key)
    return keys


def event_tag_value(
    step: int, layer: str, kind: str, reading: str, magnitude: float | None, message: str
) -> str:
    """What an event's tag says, readable where MLflow's tag list cuts the key short:
    ``collapse of lambda_ratio | step 120 | layer h.3 | magnitude 2.31 decades | <message>``
    (what happened first: the list shows a tag's first few dozen characters), cut to
    MLflow's tag value length. The magnitude's unit is that of the reading: decades for
    ratios, values and logs, a difference for fractions, directions for counts;
    collapsed pairs for a ``transition``."""
    what = f"{kind} of {reading}" if reading else kind
    parts = [what, f"step {int(step)}", f"layer {layer or '(model)'}"]
    if magnitude is not None and math.isfinite(magnitude):
        parts.append(f"magnitude {magnitude:.3g}{_magnitude_unit(kind, reading)}")
    if message:
        parts.append(message)
    return truncate(" | ".join(parts), LIMITS["tag_value"])


def _magnitude_unit(kind: str, reading: str) -> str:
    if kind == "transition":
        return " collapsed pairs"
    from ddsmon.readings import reading as row

    try:
        unit = row(reading).unit
    except KeyError:
        return ""
    if unit in ("value", "ratio", "nats", "floor"):
        return " decades"
    if unit == "count":
        return " directions"  # ranks, dead counts, dying directions
    return ""


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


#: The query that opens MLflow 3's UI in its "Model training" view. The UI picks the view
#: from this query, else from the browser's last choice (GenAI at first); the experiment
#: tag ``mlflow.experimentKind`` does not decide it (MLflow 3.17).
MODEL_TRAINING_QUERY = "workflowType=machine_learning"


def review_url(
    tracking_uri: str | None, experiment_id: str, run_id: str | None = None, tab: str = ""
) -> str | None:
    """The UI page of an experiment (or of one of its runs, and a tab of it such as
    ``"model-metrics"``) in the model-training view, for an ``http(s)`` tracking URI
    (credentials left out); None for any other store."""
    from urllib.parse import quote, urlsplit

    if not tracking_uri:
        return None
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    page = f"/experiments/{quote(str(experiment_id))}"
    if run_id:
        page += f"/runs/{quote(run_id)}" + (f"/{tab.strip('/')}" if tab else "")
    base = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"
    return f"{base}/#{page}?{MODEL_TRAINING_QUERY}"


def directory_id(directory: Path | str) -> str:
    """The sha1 of a directory's absolute path: the value of :data:`DIRECTORY_ID_TAG`."""
    return hashlib.sha1(str(Path(directory).resolve()).encode()).hexdigest()
