"""The shapes a run's programs may take. Every size that varies from step to step (prompt width, response
width, rows, image tokens, vision patches) is rounded up to a bucket here, so a run compiles a small fixed set
of programs in its first steps and nothing after.

Sizes that follow the data (image tokens of a batch, its widest prompt) also keep a high-water mark
(`HighWater`): a later, smaller batch is padded to the largest bucket seen so far instead of compiling a program
for a smaller one, so new programs appear only when a batch exceeds every earlier one, rarer with every step.
"""

from __future__ import annotations


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= value (and >= multiple)."""
    return max(multiple, -(-int(value) // multiple) * multiple)


def power_of_two(value: int) -> int:
    """The smallest power of two >= value (1 for value <= 1)."""
    return 1 << max(0, int(value) - 1).bit_length()


def geometric(value: int, minimum: int = 16, steps_per_octave: int = 4) -> int:
    """`value` rounded up on a geometric grid: `steps_per_octave` sizes between consecutive powers of two
    (16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ...), never below `minimum`. Padding wastes at most
    1/steps_per_octave of the size, and sizes up to N take about steps_per_octave * log2(N / minimum) buckets."""
    value = max(int(value), minimum)
    octave = power_of_two(value) // 2
    if octave < steps_per_octave:
        return power_of_two(value)
    step = octave // steps_per_octave
    return round_up(value, step)


class HighWater:
    """Per-name sizes that only grow: `hw(name, size)` returns max(size, every earlier size of that name)."""

    def __init__(self):
        self.marks: dict[str, int] = {}

    def __call__(self, name: str, size: int) -> int:
        self.marks[name] = max(self.marks.get(name, 0), int(size))
        return self.marks[name]
