"""The Prometheus text format, written straight from the metric families.

prometheus_client's ``generate_latest`` builds a Metric and a Sample object
per series and formats each label set anew: with 200 workers by 50 task names
(~40k samples) that takes over half a second a scrape. ``TextWriter`` writes
the same bytes directly and keeps each series' label text from one scrape to
the next, since label sets rarely change. OpenMetrics, when a scraper asks
for it, still goes through prometheus_client.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .metrics import COUNTER, HISTOGRAM, Histogram, LabelValues, Metrics


class TextWriter:
    """Renders one ``Metrics`` in text format 0.0.4, as ``generate_latest`` would."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._labels: dict[str, dict[LabelValues, tuple[str, str, str]]] = {}

    def text(self) -> bytes:
        extra = tuple(self.metrics.static_labels.items())
        out: list[str] = []
        for family in self.metrics.families.values():
            spec = family.spec
            help_text = spec.help.replace("\\", r"\\").replace("\n", r"\n")
            kind = "counter" if spec.kind == COUNTER else spec.kind
            out.append(f"# HELP {spec.name} {help_text}\n# TYPE {spec.name} {kind}\n")
            # Copy first: the event thread may add series while we render.
            items = list(family.values.items())
            known = self._labels.get(spec.name, {})
            labels = {
                key: known.get(key) or _label_text(spec.labels, key, extra, spec.kind == HISTOGRAM)
                for key, _ in items
            }
            self._labels[spec.name] = labels  # series gone since the last scrape drop out
            if isinstance(family, Histogram):
                _histogram_lines(out, family, items, labels)
            else:
                name = spec.name
                out.extend(f"{name}{labels[key][0]} {_value(value)}\n" for key, value in items)
        return "".join(out).encode()


def _value(value: float) -> str:
    """``floatToGoString``, whose result is ``repr`` for every value a counter mostly has."""
    return repr(float(value)) if -1e6 < value < 1e6 else floatToGoString(value)


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _label_text(
    names: tuple[str, ...], values: LabelValues, extra: tuple[tuple[str, str], ...], histogram: bool
) -> tuple[str, str, str]:
    """``{a="x",b="y"}`` for a series, labels sorted by name as prometheus_client writes them.

    For histograms also the text before and after where ``le`` sorts in.
    """
    pairs = [
        f'{name}="{_escape(value)}"'
        for name, value in sorted([*zip(names, values, strict=True), *extra])
    ]
    plain = f"{{{','.join(pairs)}}}" if pairs else ""
    if not histogram:
        return plain, "", ""
    names_sorted = sorted([*names, *(name for name, _ in extra)])
    split = sum(1 for name in names_sorted if name < "le")
    before = "".join(f"{pair}," for pair in pairs[:split])
    after = "".join(f",{pair}" for pair in pairs[split:])
    return plain, before, after


def _histogram_lines(
    out: list[str],
    family: Histogram,
    items: list[tuple[LabelValues, list[float]]],
    labels: dict[LabelValues, tuple[str, str, str]],
) -> None:
    name = family.spec.name
    for key, series in items:
        buckets, total = family.buckets(series)
        plain, before, after = labels[key]
        out.extend(
            f'{name}_bucket{{{before}le="{edge}"{after}}} {_value(cumulative)}\n'
            for edge, cumulative in buckets
        )
        out.append(
            f"{name}_count{plain} {_value(buckets[-1][1])}\n{name}_sum{plain} {_value(total)}\n"
        )


class Registry(CollectorRegistry):
    """The daemon's registry: ``Metrics`` collectors write their own text format.

    Anything else registered here (none by default) is rendered by
    prometheus_client after them.
    """

    def __init__(self) -> None:
        super().__init__(auto_describe=False)
        self._writers: dict[Collector, TextWriter] = {}
        self._others = CollectorRegistry(auto_describe=False)

    def register(self, collector: Collector) -> None:
        super().register(collector)
        if isinstance(collector, Metrics):
            self._writers[collector] = TextWriter(collector)
        else:
            self._others.register(collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        if self._writers.pop(collector, None) is None:
            self._others.unregister(collector)

    def text(self) -> bytes:
        """Everything registered, in the Prometheus text format (0.0.4)."""
        return b"".join(
            [*(w.text() for w in list(self._writers.values())), generate_latest(self._others)]
        )
