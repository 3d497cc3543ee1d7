"""One row of the metrics table: what a Prometheus metric is (type, name, help, labels, buckets or how workers
combine), apart from the object that counts it.

`Metrics` (metrics.py) lists its metrics as class attributes made here, one row each, so the whole set reads as
data: `cache_lookups = counter("cache_lookups", "Cache lookups of unique inputs by result ...", ("result",))`.
Each `Metrics` instance builds the objects from the rows into its own registry (`build_all`); the built object then
sits on the instance under the row's attribute name, so the hot path reads a plain attribute, and type checkers see
the row as the object it builds (a Counter, a Gauge, a Histogram).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, overload

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "embedding_proxy"
# How a gauge's per-worker values combine into the machine's when several workers run (prometheus-client's modes).
Combine = Literal["livesum", "mostrecent", "max"]
M = TypeVar("M", Counter, Gauge, Histogram)


@dataclass(frozen=True)
class Declared(Generic[M]):
    """A metric's declaration: its full name is `embedding_proxy_<name>` (counters gain `_total` on export)."""

    kind: type[M]
    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None  # histograms
    combine: Combine | None = None  # gauges
    attr: str = field(default="", compare=False)  # the attribute it is built under (set by the class it sits in)

    def __set_name__(self, owner: type, name: str) -> None:
        object.__setattr__(self, "attr", name)

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Declared[M]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> M: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> Declared[M] | M:
        if obj is None:
            return self
        # reached only when the instance has not built this row yet: build_all puts the object on the instance
        raise AttributeError(f"metric {self.attr!r} is built when the Metrics instance is made")

    @property
    def full_name(self) -> str:
        return f"{PREFIX}_{self.name}"

    def build(self, registry: CollectorRegistry) -> M:
        options: dict[str, Any] = {"registry": registry}
        if self.buckets is not None:
            options["buckets"] = self.buckets
        if self.combine is not None:
            options["multiprocess_mode"] = self.combine
        return self.kind(self.full_name, self.help, self.labels, **options)


def counter(name: str, help: str, labels: tuple[str, ...] = ()) -> Declared[Counter]:
    return Declared(Counter, name, help, labels)


def gauge(name: str, help: str, labels: tuple[str, ...] = (), *, combine: Combine) -> Declared[Gauge]:
    """Every gauge says how workers combine: there is no right default (a count adds up, a limit does not)."""
    return Declared(Gauge, name, help, labels, combine=combine)


def histogram(name: str, help: str, labels: tuple[str, ...], *, buckets: tuple[float, ...]) -> Declared[Histogram]:
    return Declared(Histogram, name, help, labels, buckets=buckets)


def declarations(cls: type) -> list[Declared[Any]]:
    """The rows of a class's table, in the order written (the order /metrics lists them), base classes first."""
    rows: list[Declared[Any]] = []
    for klass in reversed(cls.__mro__):
        rows.extend(value for value in vars(klass).values() if isinstance(value, Declared))
    return rows


def build_all(obj: object, registry: CollectorRegistry) -> None:
    """Build every row of `obj`'s class into `registry` and set it on `obj` under the row's attribute."""
    for row in declarations(type(obj)):
        vars(obj)[row.attr] = row.build(registry)
