"""Money as the proxy reports it: US dollars as a plain decimal string with 6 decimals (`"0.000055"`), in JSON and
CSV alike, never a binary float (`5.5259999999999996e-05`) or an exponent (`2.8e-07`).

Amounts are computed in `decimal` from each model's configured `price_per_million_tokens`, taken as the decimal
the config wrote (TOML floats arrive as binary floats; their shortest repr is that text for any price of up to 15
significant digits), summed exactly, and rounded once, half up, to the micro-dollar. Prometheus counters stay
floats (Prometheus has no other number type).
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable

MICRO_USD = decimal.Decimal("0.000001")
# Exact for any token count and price a ledger holds: far above the digits n * price can have.
_EXACT = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_UP)


def price(per_million_tokens: float) -> decimal.Decimal:
    """The configured price, as the decimal the operator wrote (0.02, not 0.0200000000000000004163...)."""
    return decimal.Decimal(repr(per_million_tokens))


def cost_usd(tokens_at_price: Iterable[tuple[int, float]]) -> str:
    """What (token count, price per million tokens) pairs cost, summed exactly, as `usd` text."""
    total = decimal.Decimal(0)
    for n, p in tokens_at_price:
        total = _EXACT.fma(n, price(p), total)
    return usd(_EXACT.scaleb(total, -6))


def usd(amount: decimal.Decimal) -> str:
    """`amount` rounded half up to 6 decimals, as plain digits: "0.000055", "12.500000", "0.000000"."""
    return f"{amount.quantize(MICRO_USD, rounding=decimal.ROUND_HALF_UP, context=_EXACT):f}"
