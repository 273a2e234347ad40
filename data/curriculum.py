"""Sequence-length curriculum: the length of step ``t``, with tokens per optimizer step held constant.

Tokens per micro-batch are fixed at ``micro_batch_size x data.seq_len``; a step at length ``L`` uses
``micro_batch_size x data.seq_len / L`` sequences per micro-batch, so every length of the schedule
must divide that product. Two forms:

* ``stages``: ``[[from_step, seq_len], ...]`` starting at step 0;
* ``ramp``: ``{start, end, steps}``: a linear ramp from ``start`` to ``end`` over ``steps`` steps,
  each step taking the longest allowed length not above the ramp (allowed: divisors of the tokens
  per micro-batch between ``start`` and ``end``).

The length is a pure function of the step, so a run resumed mid-curriculum continues the schedule.
"""

from __future__ import annotations


class SeqLenSchedule:
    def __init__(self, tokens_per_micro: int, base_len: int, curriculum=None):
        self.tokens_per_micro, self.base_len, self.curriculum = tokens_per_micro, base_len, curriculum
        if curriculum is not None and curriculum.ramp is not None:
            r = curriculum.ramp
            self.allowed = [n for n in range(r.start, r.end + 1) if tokens_per_micro % n == 0]

    def at(self, step: int) -> int:
        """Sequence length of the step that starts after ``step`` completed steps."""
        c = self.curriculum
        if c is None:
            return self.base_len
        if c.stages is not None:
            length = c.stages[0][1]
            for start, seq_len in c.stages:
                if step >= start:
                    length = seq_len
            return length
        r = c.ramp
        target = r.start + (r.end - r.start) * min(1.0, step / max(1, r.steps))
        return max(n for n in self.allowed if n <= target + 1e-9)

    def lengths(self) -> list[int]:
        c = self.curriculum
        if c is None:
            return [self.base_len]
        if c.stages is not None:
            return sorted({s for _, s in c.stages})
        return self.allowed

    def rows(self, step: int) -> int:
        """Sequences per micro-batch at this step."""
        return self.tokens_per_micro // self.at(step)
