"""Micro-batches whose cost follows the real tokens: rows grouped by response length, each group cut to a
bucket of its own longest response, with as many rows as a per-device token budget allows.

Reasoning answers spread widely (a few hundred tokens typically, a few at the cap), so a batch laid out at
prompt + max_new_tokens columns spends most of the update on padding. Here rows are sorted by length, longest
first; a micro-batch takes the next rows, keeps only the response columns up to the power-of-two bucket of its
longest response, and holds `token_budget // width` rows per device (a power of two), so short rows travel many
to a micro-batch and long ones few. Widths and row counts come from small fixed sets, so the compiled programs
are few and known after the first steps (verl's dynamic batch size and balance_batch play the same role).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import buckets

MIN_RESPONSE_WIDTH = 32


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    rows: np.ndarray  # [n] indices into the batch; the first `real` are distinct rows, the rest pad (copies of row 0)
    real: int
    response_width: int  # response columns kept (the batch's prompt columns are always kept whole)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.response_width


def response_width(longest: int, columns: int) -> int:
    """The bucket of a micro-batch whose longest response has `longest` tokens, in a batch of `columns`."""
    return min(columns, max(MIN_RESPONSE_WIDTH, buckets.power_of_two(max(longest, 1))))


def widths(response_columns: int) -> list[int]:
    """Every response width a micro-batch can take: powers of two from MIN_RESPONSE_WIDTH, capped at the batch's."""
    out = [min(MIN_RESPONSE_WIDTH, response_columns)]
    while out[-1] < response_columns:
        out.append(min(out[-1] * 2, response_columns))
    return out


def rows_per_device(token_budget: int, columns: int) -> int:
    """Rows of `columns` tokens one device runs within `token_budget`: a power of two, at least one."""
    return 1 << (max(1, token_budget // columns).bit_length() - 1)


def plan(response_lengths, prompt_columns: int, response_columns: int, *, token_budget: int, shards: int = 1,
         max_rows: int | None = None) -> list[MicroBatch]:
    """Split rows (indices 0..B-1 of the batch) into micro-batches, longest responses first.

    token_budget: tokens one device processes in one forward/backward (prompt + response columns x rows).
    shards: devices the rows of a micro-batch are split over; a micro-batch holds a multiple of it.
    max_rows: cap on the rows of a micro-batch (None: no cap beyond the budget).
    """
    lengths = np.asarray(response_lengths)
    order = np.argsort(-lengths, kind="stable")
    out, start = [], 0
    while start < len(order):
        width = response_width(int(lengths[order[start]]), response_columns)
        rows = shards * rows_per_device(token_budget, prompt_columns + width)
        if max_rows:
            rows = max(shards, min(rows, buckets.round_up(max_rows, shards)))
        left = -(-(len(order) - start) // shards)
        rows = min(rows, shards * buckets.power_of_two(left))  # the last one: no more padding rows than needed
        take = order[start:start + rows]
        pad = np.zeros(rows - len(take), take.dtype)
        out.append(MicroBatch(rows=np.concatenate([take, pad]), real=len(take), response_width=width))
        start += len(take)
    return out


def padded_tokens(micro_batches: list[MicroBatch], prompt_columns: int) -> int:
    """Token slots the micro-batches compute (real tokens and padding)."""
    return sum(len(m.rows) * (prompt_columns + m.response_width) for m in micro_batches)
