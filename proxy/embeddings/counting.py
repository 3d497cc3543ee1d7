"""Phase 3, count and check: the tokens of every input the tiers did not have, the model's limits, and, where quotas
count every prompt token (not only those sent upstream), the charge of them all.

Only misses are counted (an entry carries its input's tokens); a large batch is counted off the event loop. A
request over a limit is refused with OpenAI's 400 before anything goes upstream, and its request slot is given
back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from ..config import ModelSettings
from ..errors import InvalidRequest
from ..tokens import Tokenizer
from .job import Job

# Above this many characters of uncached text, token counting moves off the event loop.
_INLINE_COUNT_CHARS = 64 * 1024


def check_limits(spec: ModelSettings, counts: Sequence[int], positions: Sequence[int]) -> None:
    """Raise InvalidRequest for an input over the model's `max_input_tokens` or a request over `max_request_tokens`.
    `counts` is per unique input, `positions` maps each input position to its unique index."""
    for p, idx in enumerate(positions):
        if counts[idx] > spec.max_input_tokens:
            raise InvalidRequest(
                f"Input {p} has {counts[idx]} tokens; this model's maximum input length is "
                f"{spec.max_input_tokens} tokens.", param="input", code="invalid_input",
            )
    total = sum(counts[idx] for idx in positions)
    if total > spec.max_request_tokens:
        raise InvalidRequest(
            f"The request has {total} tokens; at most {spec.max_request_tokens} are allowed per request.",
            param="input", code="invalid_input",
        )


class TokenCheck:
    def __init__(self, tokenizers: Mapping[str, Tokenizer]) -> None:
        self._tokenizers = tokenizers

    async def count_and_check(self, job: Job) -> None:
        """Fill `job.counts`; raise InvalidRequest (the request slot given back) or the quota's 429."""
        job.counts = counts = [e.tokens if e is not None else 0 for e in job.found]
        ticket = job.ticket
        try:
            if job.misses:
                got = await self.count(job.spec, job.req.kind, [job.inputs.items[i] for i in job.misses])
                for i, n in zip(job.misses, got, strict=True):
                    counts[i] = n
            check_limits(job.spec, counts, job.inputs.positions)
        except InvalidRequest:
            if ticket is not None:
                await ticket.release_request()
            raise
        if ticket is not None and ticket.counts_all:
            await ticket.charge_tokens(sum(counts[p] for p in job.inputs.positions))

    async def count(self, spec: ModelSettings, kind: str, items: list[str | list[int]]) -> list[int]:
        """Tokens per item as the model counts them; token ids outside its vocabulary are refused."""
        tokenizer = self._tokenizers[spec.tokenizer]
        if kind == "t":
            for n, ids in enumerate(items):
                if max(ids) >= tokenizer.vocab_size:  # type: ignore[operator]
                    raise InvalidRequest(
                        f"A token id in input {n} is outside the model's vocabulary of {tokenizer.vocab_size}.",
                        param="input", code="invalid_input",
                    )
            return [len(ids) for ids in items]
        texts: list[str] = items  # type: ignore[assignment]
        special = spec.count_special_tokens
        if sum(map(len, texts)) <= _INLINE_COUNT_CHARS:
            return tokenizer.count_many(texts, special)
        return await asyncio.get_running_loop().run_in_executor(None, tokenizer.count_many, texts, special)
