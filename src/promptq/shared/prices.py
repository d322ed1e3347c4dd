"""Prices in dollars: what a request cost, and what the Batch API saved.

A price table maps a model to USD per million input and output tokens and the discount
of the provider's Batch API (``batch_discount``: 0.5 = half price). promptq ships the
prices of common OpenAI models as published on OpenAI's price list in August 2025
(``PRICES_AS_OF``); ``PROMPTQ_PRICES`` names a JSON file of the same shape that
overrides and extends them:

    {"gpt-4o-mini": {"input_per_1m": 0.15, "output_per_1m": 0.60, "batch_discount": 0.5}}

A model missing from the table has no price: its requests give no cost, never a
guessed one (a batch with any of them has no ``cost_usd``). A dated snapshot name
(``gpt-4o-mini-2024-07-18``) takes its model's price.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from promptq.shared.errors import ConfigError
from promptq.shared.stats import usage_tokens

PRICES_AS_OF = "2025-08"


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens, and the Batch API's discount (0.5: half price)."""

    input_per_1m: float
    output_per_1m: float
    batch_discount: float = 0.5

    def cost(self, tokens_in: int, tokens_out: int, *, batch: bool) -> tuple[float, float]:
        """(paid, saved) in USD for these tokens; ``batch``: through the Batch API."""
        full = (tokens_in * self.input_per_1m + tokens_out * self.output_per_1m) / 1_000_000
        if not batch:
            return full, 0.0
        paid = full * (1 - self.batch_discount)
        return paid, full - paid


#: OpenAI's list prices (``PRICES_AS_OF``), standard tier, USD per 1M tokens
BUILT_IN: dict[str, Price] = {
    "gpt-5": Price(1.25, 10.00),
    "gpt-5-mini": Price(0.25, 2.00),
    "gpt-5-nano": Price(0.05, 0.40),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "o3": Price(2.00, 8.00),
    "o4-mini": Price(1.10, 4.40),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "text-embedding-3-small": Price(0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.0),
}

_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")
#: model names whose price lookup is remembered (bounds memory against odd names)
MAX_RESOLVED = 1000


@dataclass(slots=True)
class Spend:
    """What one worker's answers cost so far (its heartbeat, ``/metrics``): USD paid,
    USD saved through the Batch API, answers from the cache, answers with no price, and
    the tokens the upstream answered with (input + output; the dashboard's TPM in use)."""

    cost_usd: float = 0.0
    saved_usd: float = 0.0
    cached: int = 0
    unpriced: int = 0
    tokens: int = 0

    def add(
        self,
        cost: tuple[float, float] | None,
        *,
        cached: bool = False,
        tokens: tuple[int, int] = (0, 0),
    ) -> None:
        if cached:  # it spent none of the upstream's tokens (per minute or in dollars)
            self.cached += 1
            return
        self.tokens += tokens[0] + tokens[1]
        if cost is None:
            self.unpriced += 1
        else:
            self.cost_usd += cost[0]
            self.saved_usd += cost[1]


class PriceTable:
    """Prices by model: the built-in ones, overridden by a file's."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self.prices = dict(prices)
        self._resolved: dict[str, Price | None] = {}

    def __repr__(self) -> str:
        return f"PriceTable({len(self.prices)} models)"

    @classmethod
    def load(
        cls, path: str | Path | None = None, *, extra: Mapping[str, Price] | None = None
    ) -> PriceTable:
        """The built-in table, overridden by the JSON file at ``path``
        (``PROMPTQ_PRICES``); ``ConfigError`` saying what is wrong with the file."""
        prices = dict(BUILT_IN)
        if path:
            prices.update(read_prices(Path(path)))
        prices.update(extra or {})
        return cls(prices)

    def price(self, model: str | None) -> Price | None:
        if not model:
            return None
        try:
            return self._resolved[model]
        except KeyError:
            pass
        found = self.prices.get(model)
        if found is None:
            found = self.prices.get(_SNAPSHOT.sub("", model))
        if len(self._resolved) < MAX_RESOLVED:
            self._resolved[model] = found
        return found

    def cost_of(
        self,
        body: Any,
        request_model: Any,
        *,
        batch: bool,
        tokens: tuple[int, int] | None = None,
    ) -> tuple[float, float] | None:
        """(paid, saved) in USD of one successful answer ``body`` (its ``usage``, or
        ``tokens`` when the caller has them, at the price of the model it names, else of
        the request's), or None: no price."""
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or self.price(model) is None:
            model = request_model if isinstance(request_model, str) else None
        tokens_in, tokens_out = usage_tokens(body) if tokens is None else tokens
        return self.cost(model, tokens_in, tokens_out, batch=batch)

    def cost(
        self, model: str | None, tokens_in: int, tokens_out: int, *, batch: bool
    ) -> tuple[float, float] | None:
        """(paid, saved) in USD, or None for a model with no price."""
        price = self.price(model)
        return None if price is None else price.cost(tokens_in, tokens_out, batch=batch)


def read_prices(path: Path) -> dict[str, Price]:
    try:
        raw: Any = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"PROMPTQ_PRICES {path}: cannot read: {exc.strerror}") from exc
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"PROMPTQ_PRICES {path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"PROMPTQ_PRICES {path}: expected an object of models")
    prices: dict[str, Price] = {}
    for model, entry in raw.items():
        where = f"PROMPTQ_PRICES {path}, model '{model}'"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected an object with input_per_1m, output_per_1m")
        try:
            prices[model] = Price(
                input_per_1m=_number(entry, "input_per_1m", where),
                output_per_1m=_number(entry, "output_per_1m", where),
                batch_discount=_number(entry, "batch_discount", where, default=0.5),
            )
        except KeyError as exc:
            raise ConfigError(f"{where}: missing {exc.args[0]}") from exc
        if not 0 <= prices[model].batch_discount < 1:
            raise ConfigError(f"{where}: batch_discount must be at least 0 and below 1")
    return prices


def _number(entry: Mapping[str, Any], name: str, where: str, default: float | None = None) -> float:
    if name not in entry:
        if default is None:
            raise KeyError(name)
        return default
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where}: {name} must be a number >= 0 (USD), got {value!r}")
    return float(value)
