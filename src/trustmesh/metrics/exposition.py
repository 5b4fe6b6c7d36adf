"""Counters under exact names, and the Prometheus text format (0.0.4) of any families.

prometheus_client names a counter's samples ``<name>_total``; Istio's control-plane
counters (``pilot_xds_pushes``, ``citadel_server_csr_count``) have no such suffix, and
dashboards query them by those names. :class:`CounterFamily` keeps the name as given and
:func:`render` writes ``# TYPE`` with it, so the text reads exactly as istiod's does.
A counter is a dict update on the event loop's thread: no lock, no allocation once a
label set has been seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString

__all__ = ["CounterFamily", "render"]

LabelValues = tuple[str, ...]


class _ExactCounter(Metric):
    """A counter family whose samples carry exactly the family's name."""


class CounterFamily:
    """A counter family with fixed label names, exported under exactly ``name``.

    Example::

        pushes = CounterFamily("pilot_xds_pushes", "Pushes sent.", ("type",))
        pushes.inc(("cds",))
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, start: bool = True
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        # Present at 0 from the start when it has no labels: "none yet" is an answer.
        self._values: dict[LabelValues, float] = {(): 0.0} if start and not labelnames else {}

    def inc(self, labels: LabelValues = (), amount: float = 1.0) -> None:
        self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, labels: LabelValues = ()) -> float:
        return self._values.get(labels, 0.0)

    def collect(self) -> Metric:
        family = _ExactCounter(self.name, self.documentation, "counter")
        family.name = self.name  # Metric drops a "_total" suffix; keep what we were given
        for labels, value in sorted(self._values.items()):
            family.add_sample(self.name, dict(zip(self.labelnames, labels, strict=True)), value)
        return family


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def render(families: Iterable[Metric]) -> str:
    """Families as Prometheus text, ``# TYPE`` under each family's own name (Istio's style
    for counters; prometheus_client's histogram and gauge samples are written as named)."""
    lines: list[str] = []
    for family in families:
        kind = "untyped" if family.type == "unknown" else family.type
        if kind not in ("counter", "gauge", "histogram", "summary", "untyped"):
            kind = "untyped"
        name = family.name
        if kind == "counter" and not isinstance(family, _ExactCounter):
            name = f"{name}_total"  # prometheus_client's convention: its samples are so named
        lines.append(f"# HELP {name} {_help(family.documentation)}")
        lines.append(f"# TYPE {name} {kind}")
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # a creation time per series: noise for a local mesh
            labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(sample.labels.items()))
            head = f"{sample.name}{{{labels}}}" if labels else sample.name
            value = floatToGoString(sample.value)  # type: ignore[no-untyped-call]
            lines.append(f"{head} {value}")
    return "\n".join(lines) + "\n" if lines else ""
