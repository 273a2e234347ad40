"""Chomsky-hierarchy transduction tasks of Deletang et al., "Neural Networks and the Chomsky
Hierarchy" (ICLR 2023), repository google-deepmind/neural_networks_chomsky_hierarchy.

Each task follows the definition in the repository's ``tasks/`` folder (alphabets, output
definitions, how an instance of a given length is drawn); the class docstrings say which file and
where we differ. Our own numpy implementation, one instance at a time from a caller's generator.

Sequence format for decoder-only models (``n`` = input problem length, ``m`` = output length)::

    position:  0 .. n-1        n      n+1 .. n+m      n+m+1    n+m+2 .. seq_len-1
    inputs:    x_1 .. x_n      SEP    y_1 .. y_m      EOS      PAD ...
    labels:    -100 ...        y_1    y_2 .. EOS      -100     -100 ...

Labels follow the next-token convention (``labels[t]`` is the token at ``t + 1``) on the supervised
positions only: the SEP position predicts the first output token, each output position the next
one, and the last output position predicts EOS (so every task learns where its answer ends; for
binary_addition and stack_manipulation EOS plays the paper's termination token, and the paper's
zero padding after it is not reproduced). All other labels are -100 (``IGNORE_INDEX``).

Token ids: each task has its own small vocabulary; ids ``0 .. k-1`` are the task's symbols (input
alphabet, plus output symbols where they differ from it), and the last three ids are always
``sep_id = k``, ``eos_id = k + 1``, ``pad_id = k + 2`` (``vocab_size = k + 3``).

Lengths: ``train_lengths`` / ``test_lengths`` are inclusive ranges of the input problem length
(the paper trains on 1..40 and tests on 41..500); ``sample(rng)`` draws the length uniformly from
the range of ``split`` unless ``length`` is given. ``seq_len`` defaults to the smallest length that
fits the longest instance of the chosen split's range; a smaller one raises ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from chimera.data import IGNORE_INDEX


class ChomskyTask:
    """Base class: vocabulary, length ranges, sequence formatting and sampling.

    Subclasses set ``name``, ``level`` and ``symbols`` (names of ids ``0 .. k-1``) and implement
    ``sample_problem`` (draw an input of a given length), ``solve`` (the output token ids, without
    EOS) and ``max_output_length`` (an upper bound on the output length for an input length).
    """

    name: ClassVar[str]
    level: ClassVar[str]  # "regular", "dcf" (deterministic context-free) or "cs" (context-sensitive)
    symbols: tuple[str, ...]

    def __init__(self, *, seq_len: int | None = None, train_lengths: tuple[int, int] = (1, 40),
                 test_lengths: tuple[int, int] = (41, 500), split: str = "train"):
        if split not in ("train", "test"):
            raise ValueError(f"{self.name}: split must be 'train' or 'test', got {split!r}")
        for label, (lo, hi) in (("train_lengths", train_lengths), ("test_lengths", test_lengths)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{self.name}: {label} must be an inclusive range (lo, hi) with 1 <= lo <= hi, "
                                 f"got {(lo, hi)}")
        self.train_lengths = (int(train_lengths[0]), int(train_lengths[1]))
        self.test_lengths = (int(test_lengths[0]), int(test_lengths[1]))
        self.split = split
        self.length_range = self.train_lengths if split == "train" else self.test_lengths
        k = len(self.symbols)
        self.sep_id, self.eos_id, self.pad_id = k, k + 1, k + 2
        self.vocab_size = k + 3
        needed = self.required_seq_len(self.length_range[1])
        if seq_len is None:
            seq_len = needed
        elif seq_len < needed:
            raise ValueError(f"{self.name}: seq_len={seq_len} is too small for the {split} length range "
                             f"{self.length_range}: an input of length {self.length_range[1]} needs up to "
                             f"{needed} positions (input + SEP + output + EOS); raise seq_len to >= {needed} "
                             f"or lower the range")
        self.seq_len = int(seq_len)

    @property
    def token_names(self) -> tuple[str, ...]:
        return (*self.symbols, "SEP", "EOS", "PAD")

    # -- task definition (subclasses) --------------------------------------------------------------

    def sample_problem(self, rng: np.random.Generator, length: int) -> list[int]:
        raise NotImplementedError

    def solve(self, problem: Sequence[int]) -> list[int]:
        raise NotImplementedError

    def max_output_length(self, length: int) -> int:
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------------------

    def required_seq_len(self, length: int) -> int:
        """Positions needed by the longest instance with input length ``length``."""
        return length + 1 + self.max_output_length(length) + 1

    def format(self, problem: Sequence[int], output: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``[problem] SEP [output] EOS PAD...`` and its labels; ``output`` defaults to ``solve(problem)``."""
        problem = [int(t) for t in problem]
        output = self.solve(problem) if output is None else [int(t) for t in output]
        tokens = [*problem, self.sep_id, *output, self.eos_id]
        if len(tokens) > self.seq_len:
            raise ValueError(f"{self.name}: an instance of input length {len(problem)} takes {len(tokens)} "
                             f"positions, more than seq_len={self.seq_len}")
        inputs = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        inputs[:len(tokens)] = tokens
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        n = len(problem)
        labels[n:len(tokens) - 1] = inputs[n + 1:len(tokens)]
        return inputs, labels

    def decode(self, inputs: Sequence[int]) -> tuple[list[int], list[int]]:
        """Splits a formatted sequence back into (problem, output)."""
        tokens = [int(t) for t in inputs]
        sep = tokens.index(self.sep_id)
        end = tokens.index(self.eos_id, sep)
        return tokens[:sep], tokens[sep + 1:end]

    def draw_length(self, rng: np.random.Generator) -> int:
        lo, hi = self.length_range
        return int(rng.integers(lo, hi + 1))

    def sample(self, rng: np.random.Generator, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One (inputs, labels) pair of length ``seq_len``; ``length`` is the input problem length,
        drawn uniformly from the split's range when not given."""
        if length is None:
            length = self.draw_length(rng)
        elif length < 1:
            raise ValueError(f"{self.name}: the input length must be >= 1, got {length}")
        elif self.required_seq_len(length) > self.seq_len:
            raise ValueError(f"{self.name}: input length {length} needs seq_len >= {self.required_seq_len(length)}, "
                             f"this task has seq_len={self.seq_len}")
        return self.format(self.sample_problem(rng, int(length)))


def _random_string(rng: np.random.Generator, length: int, alphabet_size: int) -> list[int]:
    return rng.integers(0, alphabet_size, size=length).tolist()


# ---------------------------------------------------------------------------------------------------
# Regular tasks
# ---------------------------------------------------------------------------------------------------


class ParityCheck(ChomskyTask):
    """Parity check (regular), ``tasks/regular/parity_check.py``: is the number of 1s odd?

    Input: a uniform random binary string. Output (one token): 0 if the count of 1s is even, 1 if odd.
    Token ids: 0, 1 = bits (also the output classes), 2 = SEP, 3 = EOS, 4 = PAD.
    Example: ``1 0 1 0 1 0 0`` (three 1s) -> ``1``.
    """

    name = "parity_check"
    level = "regular"
    symbols = ("0", "1")

    def sample_problem(self, rng, length):
        return _random_string(rng, length, 2)

    def solve(self, problem):
        return [sum(problem) % 2]

    def max_output_length(self, length):
        return 1


class EvenPairs(ChomskyTask):
    """Even pairs (regular), ``tasks/regular/even_pairs.py``: is the number of ``01`` and ``10``
    substrings (adjacent unequal pairs) odd?

    Input: a uniform random binary string. Output (one token): 0 if the count is even, 1 if odd
    (equivalently: 1 iff the first and last bits differ).
    Token ids: 0, 1 = bits (also the output classes), 2 = SEP, 3 = EOS, 4 = PAD.
    Example: ``0 1 0 1 0 0 1`` (two 10s, three 01s) -> ``1``.
    """

    name = "even_pairs"
    level = "regular"
    symbols = ("0", "1")

    def sample_problem(self, rng, length):
        return _random_string(rng, length, 2)

    def solve(self, problem):
        return [sum(a != b for a, b in zip(problem[:-1], problem[1:])) % 2]

    def max_output_length(self, length):
        return 1


class CycleNavigation(ChomskyTask):
    """Cycle navigation (regular), ``tasks/regular/cycle_navigation.py``: the final position on a
    cycle of 5 states, starting at 0, after a string of moves.

    Input: uniform random actions; as in the reference, action token ``a`` moves by ``a - 1``
    (0 = step left, 1 = stay, 2 = step right). Output (one token): the final position mod 5.
    Token ids: 0, 1, 2 = left/stay/right; 3 + s = final position s (3..7); 8 = SEP, 9 = EOS, 10 = PAD.
    Example: ``2 0 1 0 0`` (moves +1 -1 0 -1 -1 = -2) -> position 3 -> token ``6``.
    """

    name = "cycle_navigation"
    level = "regular"
    cycle_length = 5
    symbols = ("L", "S", "R", *(f"@{s}" for s in range(5)))

    def sample_problem(self, rng, length):
        return _random_string(rng, length, 3)

    def solve(self, problem):
        return [3 + sum(a - 1 for a in problem) % self.cycle_length]

    def max_output_length(self, length):
        return 1


class ModularArithmetic(ChomskyTask):
    """Modular arithmetic without brackets (regular), ``tasks/regular/modular_arithmetic.py``.

    Input: ``r_0 o_1 r_1 ... o_k r_k`` with residues ``r_i`` uniform in ``{0 .. modulus-1}`` and
    operators ``o_i`` uniform in ``operators`` (default ``+ - *``). Output (one token): the value of
    the expression mod ``modulus`` with the usual precedence, as in the reference (which replaces
    ``a - b`` by ``a + (-b)`` and performs the multiplications first): ``*`` binds tighter than ``+``
    and ``-``; ``+`` and ``-`` are evaluated left to right. The modulus is 5 in the paper.
    Input strings have odd length; as in the reference, an even length is lowered by one.
    Token ids (modulus ``M``): 0..M-1 = residues (also the output values); M = ``+``, M+1 = ``-``,
    M+2 = ``*`` (the reference's encoding); M+3 = SEP, M+4 = EOS, M+5 = PAD (M = 5: 8, 9, 10).
    Examples (mod 5): ``1 + 2 * 3`` -> 2, ``1 - 1 - 1`` -> 4, ``0 * 1 + 4 * 3 - 2`` -> 0.
    """

    name = "modular_arithmetic"
    level = "regular"
    OPERATORS = ("+", "-", "*")

    def __init__(self, *, modulus: int = 5, operators: Sequence[str] = ("+", "-", "*"), **kwargs):
        if modulus < 2:
            raise ValueError(f"{self.name}: modulus must be >= 2, got {modulus}")
        unknown = set(operators) - set(self.OPERATORS)
        if unknown or not operators:
            raise ValueError(f"{self.name}: operators must be a non-empty subset of {self.OPERATORS}, got {operators}")
        self.modulus = int(modulus)
        self.symbols = (*(str(r) for r in range(self.modulus)), *self.OPERATORS)
        self.operator_ids = [self.modulus + self.OPERATORS.index(op) for op in operators]
        super().__init__(**kwargs)

    def sample_problem(self, rng, length):
        if length % 2 == 0:
            length -= 1
        residues = rng.integers(0, self.modulus, size=length // 2 + 1)
        ops = rng.choice(self.operator_ids, size=length // 2)
        problem = [0] * length
        problem[0::2] = residues.tolist()
        problem[1::2] = [int(o) for o in ops]
        return problem

    def solve(self, problem):
        plus, minus, times = (self.modulus + i for i in range(3))
        total, term = 0, problem[0]
        for op, value in zip(problem[1::2], problem[2::2]):
            if op == times:
                term *= value
            elif op in (plus, minus):
                total += term
                term = value if op == plus else -value
            else:
                raise ValueError(f"{self.name}: token {op} is not an operator")
        return [(total + term) % self.modulus]

    def max_output_length(self, length):
        return 1


# ---------------------------------------------------------------------------------------------------
# Deterministic context-free tasks
# ---------------------------------------------------------------------------------------------------


class _StringTask(ChomskyTask):
    """A string transduction over an alphabet of ``alphabet_size`` symbols (binary in the paper)."""

    def __init__(self, *, alphabet_size: int = 2, **kwargs):
        if alphabet_size < 2:
            raise ValueError(f"{self.name}: alphabet_size must be >= 2, got {alphabet_size}")
        self.alphabet_size = int(alphabet_size)
        self.symbols = tuple(str(s) for s in range(self.alphabet_size))
        super().__init__(**kwargs)

    def sample_problem(self, rng, length):
        return _random_string(rng, length, self.alphabet_size)

    def max_output_length(self, length):
        return len(self.solve([0] * length))


class ReverseString(_StringTask):
    """Reverse string (DCF), ``tasks/dcf/reverse_string.py``: ``s_1 .. s_n -> s_n .. s_1``.

    Token ids (alphabet size ``A``, 2 in the paper): 0..A-1 = symbols; A = SEP, A+1 = EOS, A+2 = PAD.
    Example: ``0 1 1 0 1 0`` -> ``0 1 0 1 1 0``.
    """

    name = "reverse_string"
    level = "dcf"

    def solve(self, problem):
        return list(problem)[::-1]


class StackManipulation(ChomskyTask):
    """Stack manipulation (DCF), ``tasks/dcf/stack_manipulation.py``.

    Input: an initial stack of bits given bottom-to-top, followed by actions POP / PUSH 0 / PUSH 1.
    As in the reference, for length 1 the input is a single bit; otherwise the stack length is
    uniform in ``1 .. length-1``, its bits uniform, and the remaining positions uniform actions.
    POP on an empty stack is ignored. Output: the final stack top-to-bottom (possibly empty), then
    EOS, which plays the reference's termination token.
    Token ids: 0, 1 = bits; 2 = POP, 3 = PUSH 0, 4 = PUSH 1 (the reference's encoding); 5 = SEP,
    6 = EOS, 7 = PAD.
    Example: ``0 1 1 0 PUSH1 POP POP`` -> ``1 1 0``; ``1 1 0 POP POP POP`` -> (empty).
    """

    name = "stack_manipulation"
    level = "dcf"
    symbols = ("0", "1", "POP", "PUSH0", "PUSH1")
    POP, PUSH0, PUSH1 = 2, 3, 4

    def sample_problem(self, rng, length):
        if length == 1:
            return [int(rng.integers(0, 2))]
        stack_length = int(rng.integers(1, length))
        stack = rng.integers(0, 2, size=stack_length).tolist()
        actions = rng.integers(2, 5, size=length - stack_length).tolist()
        return stack + actions

    def solve(self, problem):
        stack, acting = [], False
        for token in problem:
            if token in (0, 1):
                if acting:
                    raise ValueError(f"{self.name}: the stack bits must precede the actions")
                stack.append(token)
                continue
            acting = True
            if token == self.POP:
                if stack:
                    stack.pop()
            elif token in (self.PUSH0, self.PUSH1):
                stack.append(token - self.PUSH0)
            else:
                raise ValueError(f"{self.name}: token {token} is not a stack action")
        return stack[::-1]

    def max_output_length(self, length):
        return length


# ---------------------------------------------------------------------------------------------------
# Context-sensitive tasks
# ---------------------------------------------------------------------------------------------------


class DuplicateString(_StringTask):
    """Duplicate string (CS), ``tasks/cs/duplicate_string.py``: ``s -> s s`` (no separator).

    Token ids (alphabet size ``A``, 2 in the paper): 0..A-1 = symbols; A = SEP, A+1 = EOS, A+2 = PAD.
    Example: ``1 0 1`` -> ``1 0 1 1 0 1``.
    """

    name = "duplicate_string"
    level = "cs"

    def solve(self, problem):
        return list(problem) * 2


class OddsFirst(_StringTask):
    """Odds first (CS), ``tasks/cs/odds_first.py``: ``s_1 s_2 .. s_n -> s_1 s_3 s_5 .. s_2 s_4 ..``.

    We follow the paper and the reference's docstring and examples (1-based odd positions first:
    ``0 0 1 1 0 1 0 1 -> 0 1 0 0 0 1 1 1`` and ``1 1 0 -> 1 0 1``); note the reference's array code
    puts the 0-based odd indices first instead, which contradicts those examples.
    Token ids (alphabet size ``A``, 2 in the paper): 0..A-1 = symbols; A = SEP, A+1 = EOS, A+2 = PAD.
    """

    name = "odds_first"
    level = "cs"

    def solve(self, problem):
        problem = list(problem)
        return problem[0::2] + problem[1::2]


class BinaryAddition(ChomskyTask):
    """Binary addition (CS), ``tasks/cs/binary_addition.py``: the sum of two little-endian binary
    numbers, in little-endian binary without trailing (most significant) zeros.

    Input ``a + b``: as in the reference, for length ``n >= 3`` the first number has ``l_a`` bits
    with ``l_a`` uniform in ``1 .. n-2`` and the second ``l_b = n - 1 - l_a``; each number is uniform
    in ``1 .. 2^l - 1`` and written with exactly ``l`` little-endian bits (zero-padded at the end).
    For ``n <= 2`` there is no ``+``: the input is one number uniform in ``0 .. 2^n - 2`` on ``n``
    bits and the output is that number (``0`` for zero). Output, then EOS (the reference's
    termination token).
    Token ids: 0, 1 = bits; 2 = ``+``; 3 = SEP, 4 = EOS, 5 = PAD.
    Examples: ``0 0 1 + 0 1 1 0 1`` (4 + 22) -> ``0 1 0 1 1`` (26);
    ``1 0 0 1 + 0 0 0 0 0 1`` (9 + 32) -> ``1 0 0 1 0 1`` (41).
    """

    name = "binary_addition"
    level = "cs"
    symbols = ("0", "1", "+")
    PLUS = 2

    @staticmethod
    def to_bits(value: int, width: int = 0) -> list[int]:
        """Little-endian bits of ``value``, at least ``width`` of them (``[0]`` for zero, width 0)."""
        return [int(b) for b in reversed(f"{value:b}".zfill(width))]

    @staticmethod
    def from_bits(bits: Sequence[int]) -> int:
        return sum(int(b) << i for i, b in enumerate(bits))

    @staticmethod
    def _nonzero_number(rng: np.random.Generator, width: int) -> int:
        """Uniform in ``1 .. 2^width - 1`` for any width (rejection of the all-zero bit string)."""
        if width < 1:
            raise ValueError(f"binary_addition: a number needs at least one bit, got width {width}")
        while True:
            bits = rng.integers(0, 2, size=width)
            if bits.any():
                return BinaryAddition.from_bits(bits)

    def sample_problem(self, rng, length):
        if length <= 2:
            return self.to_bits(int(rng.integers(0, 2**length - 1)), length)
        width_a = int(rng.integers(1, length - 1))
        width_b = length - 1 - width_a
        a, b = self._nonzero_number(rng, width_a), self._nonzero_number(rng, width_b)
        return self.to_bits(a, width_a) + [self.PLUS] + self.to_bits(b, width_b)

    def solve(self, problem):
        problem = list(problem)
        if self.PLUS not in problem:
            return self.to_bits(self.from_bits(problem))
        split = problem.index(self.PLUS)
        return self.to_bits(self.from_bits(problem[:split]) + self.from_bits(problem[split + 1:]))

    def max_output_length(self, length):
        # n <= 2: at most n bits; n >= 3: a + b < 2^(n-2) + 2 needs at most n-1 bits. n is a safe bound.
        return length


CHOMSKY_TASKS: dict[str, type[ChomskyTask]] = {
    cls.name: cls
    for cls in (ParityCheck, EvenPairs, CycleNavigation, ModularArithmetic, ReverseString, StackManipulation,
                DuplicateString, OddsFirst, BinaryAddition)
}
