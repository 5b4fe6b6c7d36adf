"""Reading Prometheus text the way a scraper does (prometheus_client's parser)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def series(text: str) -> Series:
    """(sample name, labels) → value for every sample of ``text``; a counter's sample
    under its family's name (the parser reads ``pilot_xds_pushes`` as ``…_total``)."""
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if family.type == "counter" and name == f"{family.name}_total":
                name = family.name
            out[(name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(parsed: Series, name: str, **labels: str) -> float:
    """One sample's value; 0 when it is absent (a counter nobody incremented yet)."""
    return parsed.get((name, frozenset(labels.items())), 0.0)


def families(text: str) -> dict[str, str]:
    """Family name → type, as the parser reads them."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}
