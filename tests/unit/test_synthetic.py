"""Synthetic tasks: MQAR (Zoology) and the Chomsky-hierarchy tasks (Deletang et al. 2023).

Answers are recomputed here independently of the task classes (Python ints, strings, eval).
"""

import numpy as np
import pytest

from chimera.data.synthetic import (
    IGNORE_INDEX,
    MQAR,
    TASKS,
    BinaryAddition,
    CycleNavigation,
    DuplicateString,
    EvenPairs,
    ModularArithmetic,
    OddsFirst,
    ParityCheck,
    ReverseString,
    StackManipulation,
    make_task,
    sample_at,
)
from chimera.data.synthetic import chomsky as chomsky_module

CHOMSKY_NAMES = ["parity_check", "even_pairs", "cycle_navigation", "modular_arithmetic", "reverse_string",
                 "stack_manipulation", "duplicate_string", "odds_first", "binary_addition"]
IGN = IGNORE_INDEX


def small(cls, seq_len, max_length, **kwargs):
    """A task whose training range (1, max_length) fits in seq_len positions."""
    return cls(seq_len=seq_len, train_lengths=(1, max_length), **kwargs)


# -- registry and common interface -----------------------------------------------------------------


def test_registry_and_common_interface():
    assert set(TASKS) == {"mqar", *CHOMSKY_NAMES}
    assert IGNORE_INDEX == chomsky_module.IGNORE_INDEX == -100
    for name, cls in TASKS.items():
        task = make_task(name)
        assert isinstance(task, cls) and task.name == name
        for index in range(5):
            inputs, labels = sample_at(task, 0, index)
            assert inputs.dtype == labels.dtype == np.int64
            assert inputs.shape == labels.shape == (task.seq_len,)
            assert inputs.min() >= 0 and inputs.max() < task.vocab_size
            supervised = labels[labels != IGN]
            assert supervised.size > 0 and supervised.min() >= 0 and supervised.max() < task.vocab_size
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_task("no_such_task")
    task = make_task("modular_arithmetic", modulus=7, train_lengths=(1, 9))
    assert task.modulus == 7 and task.vocab_size == 7 + 3 + 3 and task.seq_len == 12


# -- Chomsky tasks: hand-written instances ---------------------------------------------------------


def test_parity_check_literal():
    task = small(ParityCheck, 12, 7)
    assert (task.sep_id, task.eos_id, task.pad_id, task.vocab_size) == (2, 3, 4, 5)
    inputs, labels = task.format([1, 0, 1, 0, 1, 0, 0])  # three 1s: odd
    assert inputs.tolist() == [1, 0, 1, 0, 1, 0, 0, 2, 1, 3, 4, 4]
    assert labels.tolist() == [IGN, IGN, IGN, IGN, IGN, IGN, IGN, 1, 3, IGN, IGN, IGN]
    assert task.solve([0, 1, 1, 1, 1]) == [0]
    assert task.solve([0]) == [0] and task.solve([1]) == [1]


def test_even_pairs_literal():
    task = small(EvenPairs, 12, 7)
    inputs, labels = task.format([0, 1, 0, 1, 0, 0, 1])  # two '10', three '01': odd
    assert inputs.tolist() == [0, 1, 0, 1, 0, 0, 1, 2, 1, 3, 4, 4]
    assert labels.tolist() == [IGN, IGN, IGN, IGN, IGN, IGN, IGN, 1, 3, IGN, IGN, IGN]
    assert task.solve([0, 0, 1, 1, 1, 0]) == [0]  # one '01', one '10'
    assert task.solve([1]) == [0] and task.solve([1, 0]) == [1]


def test_cycle_navigation_literal():
    task = small(CycleNavigation, 10, 5)
    assert (task.sep_id, task.eos_id, task.pad_id, task.vocab_size) == (8, 9, 10, 11)
    inputs, labels = task.format([2, 0, 1, 0, 0])  # +1 -1 0 -1 -1 = -2 -> position 3 -> token 6
    assert inputs.tolist() == [2, 0, 1, 0, 0, 8, 6, 9, 10, 10]
    assert labels.tolist() == [IGN, IGN, IGN, IGN, IGN, 6, 9, IGN, IGN, IGN]
    assert task.solve([2, 2, 2, 0]) == [3 + 2]
    assert task.solve([2] * 5) == [3 + 0] and task.solve([0] * 6) == [3 + 4]


def test_modular_arithmetic_literal():
    task = small(ModularArithmetic, 10, 5)
    plus, minus, times = 5, 6, 7
    assert (task.sep_id, task.eos_id, task.pad_id, task.vocab_size) == (8, 9, 10, 11)
    inputs, labels = task.format([1, plus, 2, times, 3])  # 1 + 6 = 7 = 2 (mod 5), not (1 + 2) * 3
    assert inputs.tolist() == [1, 5, 2, 7, 3, 8, 2, 9, 10, 10]
    assert labels.tolist() == [IGN, IGN, IGN, IGN, IGN, 2, 9, IGN, IGN, IGN]
    assert task.solve([1, minus, 1, minus, 1]) == [4]  # left to right: (1 - 1) - 1 = -1
    assert task.solve([0, times, 1, plus, 4, times, 3, minus, 2]) == [0]
    assert task.solve([3, minus, 2, times, 4]) == [0]  # 3 - 8 = -5
    assert task.solve([2, times, 3, times, 4, minus, 1]) == [3]  # 23
    assert task.solve([4]) == [4]


def test_reverse_string_literal():
    task = small(ReverseString, 16, 6)
    inputs, labels = task.format([0, 1, 1, 0, 1, 0])
    assert inputs.tolist() == [0, 1, 1, 0, 1, 0, 2, 0, 1, 0, 1, 1, 0, 3, 4, 4]
    assert labels.tolist() == [IGN, IGN, IGN, IGN, IGN, IGN, 0, 1, 0, 1, 1, 0, 3, IGN, IGN, IGN]
    assert ReverseString(alphabet_size=4, train_lengths=(1, 6)).solve([1, 2, 3, 0, 2, 1]) == [1, 2, 0, 3, 2, 1]


def test_duplicate_string_literal():
    task = small(DuplicateString, 12, 3)
    inputs, labels = task.format([1, 0, 1])
    assert inputs.tolist() == [1, 0, 1, 2, 1, 0, 1, 1, 0, 1, 3, 4]
    assert labels.tolist() == [IGN, IGN, IGN, 1, 0, 1, 1, 0, 1, 3, IGN, IGN]


def test_odds_first_literal():
    task = small(OddsFirst, 18, 8)
    inputs, labels = task.format([0, 0, 1, 1, 0, 1, 0, 1])  # s1 s3 s5 s7 = 0100, s2 s4 s6 s8 = 0111
    assert inputs.tolist() == [0, 0, 1, 1, 0, 1, 0, 1, 2, 0, 1, 0, 0, 0, 1, 1, 1, 3]
    assert labels.tolist() == [IGN] * 8 + [0, 1, 0, 0, 0, 1, 1, 1, 3, IGN]
    assert task.solve([1, 1, 0]) == [1, 0, 1]


def test_stack_manipulation_literal():
    task = small(StackManipulation, 16, 7)
    pop, push0, push1 = 2, 3, 4
    assert (task.sep_id, task.eos_id, task.pad_id, task.vocab_size) == (5, 6, 7, 8)
    # stack 0 1 1 0 (bottom to top), PUSH 1, POP, POP -> 0 1 1 -> output top to bottom 1 1 0
    inputs, labels = task.format([0, 1, 1, 0, push1, pop, pop])
    assert inputs.tolist() == [0, 1, 1, 0, 4, 2, 2, 5, 1, 1, 0, 6, 7, 7, 7, 7]
    assert labels.tolist() == [IGN, IGN, IGN, IGN, IGN, IGN, IGN, 1, 1, 0, 6, IGN, IGN, IGN, IGN, IGN]
    inputs, labels = task.format([1, 1, 0, pop, pop, pop])  # empty final stack: only EOS is supervised
    assert inputs.tolist() == [1, 1, 0, 2, 2, 2, 5, 6, 7, 7, 7, 7, 7, 7, 7, 7]
    assert labels.tolist() == [IGN, IGN, IGN, IGN, IGN, IGN, 6] + [IGN] * 9
    assert task.solve([1, pop, pop, push0, push1]) == [1, 0]  # a POP on the empty stack is ignored
    assert task.solve([1]) == [1]
    with pytest.raises(ValueError):
        task.solve([1, pop, 0])


def test_binary_addition_literal():
    task = small(BinaryAddition, 20, 9)
    plus = 2
    assert (task.sep_id, task.eos_id, task.pad_id, task.vocab_size) == (3, 4, 5, 6)
    # little endian: 001 = 4, 01101 = 22, 4 + 22 = 26 = 01011
    inputs, labels = task.format([0, 0, 1, plus, 0, 1, 1, 0, 1])
    assert inputs.tolist() == [0, 0, 1, 2, 0, 1, 1, 0, 1, 3, 0, 1, 0, 1, 1, 4, 5, 5, 5, 5]
    assert labels.tolist() == [IGN] * 9 + [0, 1, 0, 1, 1, 4, IGN, IGN, IGN, IGN, IGN]
    assert task.solve([1, 0, 0, 1, plus, 0, 0, 0, 0, 0, 1]) == [1, 0, 0, 1, 0, 1]  # 9 + 32 = 41
    assert task.solve([1, 1, plus, 1]) == [0, 0, 1]  # 3 + 1 = 4: carry out of the top bit
    assert task.solve([0, 1]) == [0, 1] and task.solve([0, 0]) == [0]  # length <= 2: one number, echoed


def test_format_rejects_an_instance_longer_than_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        DuplicateString(seq_len=10, train_lengths=(1, 5))  # needs 5 + 1 + 10 + 1 = 17
    task = DuplicateString(seq_len=17, train_lengths=(1, 5))
    with pytest.raises(ValueError):
        task.format([0, 1, 0, 1, 0, 1])


# -- Chomsky tasks: random samples checked against independent answers -----------------------------


def to_int(bits):
    return int("".join(map(str, bits[::-1])), 2)


def expected_output(name, problem):
    s = "".join(map(str, problem))
    if name == "parity_check":
        return [s.count("1") % 2]
    if name == "even_pairs":
        pairs = [s[i:i + 2] for i in range(len(s) - 1)]
        return [(pairs.count("01") + pairs.count("10")) % 2]
    if name == "cycle_navigation":
        return [3 + sum({0: -1, 1: 0, 2: 1}[a] for a in problem) % 5]
    if name == "modular_arithmetic":
        text = "".join("0123456789"[t] if t < 5 else "+-*"[t - 5] for t in problem)
        return [eval(text) % 5]  # Python's precedence: * before + and -, left to right
    if name == "reverse_string":
        return problem[::-1]
    if name == "duplicate_string":
        return problem + problem
    if name == "odds_first":
        return [problem[i] for i in range(0, len(problem), 2)] + [problem[i] for i in range(1, len(problem), 2)]
    if name == "stack_manipulation":
        first_action = next((i for i, t in enumerate(problem) if t >= 2), len(problem))
        stack = "".join(map(str, problem[:first_action]))
        for action in problem[first_action:]:
            stack = stack[:-1] if action == 2 else stack + str(action - 3)
        return [int(c) for c in reversed(stack)]
    if name == "binary_addition":
        if 2 not in problem:
            total = to_int(problem)
        else:
            split = problem.index(2)
            total = to_int(problem[:split]) + to_int(problem[split + 1:])
        return [int(c) for c in reversed(f"{total:b}")]
    raise AssertionError(name)


def check_layout(task, inputs, labels):
    """Returns (problem, output) after checking the layout and that labels supervise exactly the output."""
    sep = int(np.flatnonzero(inputs == task.sep_id)[0])
    eos = int(np.flatnonzero(inputs == task.eos_id)[0])
    problem, output = inputs[:sep].tolist(), inputs[sep + 1:eos].tolist()
    assert task.sep_id not in problem + output and task.eos_id not in problem + output
    assert task.pad_id not in problem + output
    assert (inputs[eos + 1:] == task.pad_id).all()
    expected = np.full(task.seq_len, IGN)
    expected[sep:eos] = inputs[sep + 1:eos + 1]  # SEP predicts y_1, ..., y_m predicts EOS
    assert labels.tolist() == expected.tolist()
    return problem, output


@pytest.mark.parametrize("name", CHOMSKY_NAMES)
def test_random_samples_are_correct(name):
    task = make_task(name, train_lengths=(1, 30))
    rng = np.random.default_rng(1234)
    for _ in range(150):
        problem, output = check_layout(task, *task.sample(rng))
        assert output == expected_output(name, problem), (problem, output)
    # a few long (test-range) instances, where binary addition needs big integers
    long_task = make_task(name, test_lengths=(41, 120), split="test")
    for index in range(8):
        problem, output = check_layout(long_task, *sample_at(long_task, 7, index))
        assert 41 <= len(problem) <= 120
        assert output == expected_output(name, problem)


def test_problem_distributions_follow_the_reference():
    rng = np.random.default_rng(5)
    stack = StackManipulation(train_lengths=(2, 20))
    adder = BinaryAddition(train_lengths=(3, 20))
    mod = ModularArithmetic(train_lengths=(1, 21))
    for _ in range(200):
        problem, _ = stack.decode(stack.sample(rng)[0])
        first_action = next(i for i, t in enumerate(problem) if t >= 2)  # at least one action
        assert 1 <= first_action <= len(problem) - 1 and all(t >= 2 for t in problem[first_action:])
        problem, _ = adder.decode(adder.sample(rng)[0])
        split = problem.index(2)
        a, b = problem[:split], problem[split + 1:]
        assert len(a) + len(b) + 1 == len(problem) and 1 in a and 1 in b  # both numbers are nonzero
        problem, _ = mod.decode(mod.sample(rng)[0])
        assert len(problem) % 2 == 1
        assert all(t < 5 for t in problem[0::2]) and all(t in (5, 6, 7) for t in problem[1::2])
    assert stack.sample_problem(rng, 1) in ([0], [1])
    assert BinaryAddition().sample_problem(rng, 1) == [0]  # the reference draws from [0, 2^n - 1)
    assert {tuple(BinaryAddition().sample_problem(rng, 2)) for _ in range(100)} == {(0, 0), (1, 0), (0, 1)}
    assert len(ModularArithmetic().sample_problem(rng, 6)) == 5  # even lengths lose one, as in the reference


# -- lengths, seq_len -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHOMSKY_NAMES)
def test_lengths_stay_in_the_split_range(name):
    train = make_task(name, train_lengths=(3, 9), test_lengths=(15, 21))
    test = make_task(name, train_lengths=(3, 9), test_lengths=(15, 21), split="test")
    assert train.length_range == (3, 9) and test.length_range == (15, 21)
    for task, (lo, hi) in ((train, (3, 9)), (test, (15, 21))):
        lengths = [len(task.decode(sample_at(task, 0, i)[0])[0]) for i in range(300)]
        assert min(lengths) >= lo and max(lengths) <= hi
        if name == "modular_arithmetic":
            assert set(lengths) == set(range(lo, hi + 1, 2))
        else:
            assert set(lengths) == set(range(lo, hi + 1))
    problem, _ = train.decode(train.sample(np.random.default_rng(0), length=1)[0])  # explicit length wins
    assert len(problem) == 1


def test_seq_len_checks():
    assert ParityCheck().seq_len == 40 + 3  # default: sized to the longest training instance
    assert DuplicateString().seq_len == 40 + 1 + 80 + 1
    assert DuplicateString(split="test").seq_len == 500 + 1 + 1000 + 1
    assert BinaryAddition(split="test").seq_len == 500 + 1 + 500 + 1
    with pytest.raises(ValueError, match="seq_len"):
        ReverseString(seq_len=81)  # 40 + 1 + 40 + 1 = 82 needed
    ReverseString(seq_len=82)
    with pytest.raises(ValueError, match="seq_len"):
        ParityCheck(seq_len=100, split="test")  # 500 + 3 needed
    with pytest.raises(ValueError, match="seq_len"):
        make_task("stack_manipulation", seq_len=30, train_lengths=(1, 15))  # 15 + 1 + 15 + 1 = 32 needed
    task = ReverseString(seq_len=82)
    with pytest.raises(ValueError):
        task.sample(np.random.default_rng(0), length=41)
    with pytest.raises(ValueError):
        task.sample(np.random.default_rng(0), length=0)
    for bad in ((0, 5), (6, 5)):
        with pytest.raises(ValueError):
            ParityCheck(train_lengths=bad)
    with pytest.raises(ValueError):
        ParityCheck(split="validation")


# -- determinism -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_sample_at_is_a_pure_function_of_seed_and_index(name):
    task = make_task(name)
    first = [sample_at(task, 11, i) for i in range(8)]
    again = [sample_at(make_task(name), 11, i) for i in reversed(range(8))][::-1]
    for (x1, y1), (x2, y2) in zip(first, again):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    x, y = task.sample(np.random.default_rng([11, 3]))
    assert np.array_equal(x, first[3][0]) and np.array_equal(y, first[3][1])
    assert len({x.tobytes() for x, _ in first}) == 8  # samples differ across indices
    assert not np.array_equal(sample_at(task, 12, 0)[0], first[0][0])  # and across seeds


# -- MQAR ------------------------------------------------------------------------------------------


def test_mqar_literal():
    task = MQAR(vocab_size=20, seq_len=16, num_kv_pairs=2, random_non_queries=False)
    assert task.key_range == (1, 10) and task.value_range == (10, 20) and task.num_slots == 6
    inputs, labels = task.build(keys=[2, 4], values=[18, 17], slots=[3, 0])
    assert inputs.tolist() == [2, 18, 4, 17, 4, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0]
    assert labels.tolist() == [IGN, IGN, IGN, IGN, 17, IGN, IGN, IGN, IGN, IGN, 18, IGN, IGN, IGN, IGN, IGN]
    fillers = list(range(100, 110))  # 16 - 4 context - 2 queries = 10 filler positions
    inputs, labels = task.build(keys=[2, 4], values=[18, 17], slots=[3, 0], fillers=fillers)
    assert inputs.tolist() == [2, 18, 4, 17, 4, 100, 101, 102, 103, 104, 2, 105, 106, 107, 108, 109]


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_structure(random_non_queries):
    task = MQAR(vocab_size=128, seq_len=64, num_kv_pairs=8, random_non_queries=random_non_queries)
    rng = np.random.default_rng(3)
    half, c = 64, 16
    fillers = []
    for _ in range(200):
        inputs, labels = task.sample(rng)
        keys, values = inputs[0:c:2].tolist(), inputs[1:c:2].tolist()
        assert len(set(keys)) == 8 and len(set(values)) == 8
        assert all(1 <= k < half for k in keys) and all(half <= v < 128 for v in values)
        pairs = dict(zip(keys, values))
        supervised = np.flatnonzero(labels != IGN)
        assert len(supervised) == 8  # every key queried exactly once
        assert (supervised >= c).all() and ((supervised - c) % 2 == 0).all()
        assert sorted(inputs[supervised].tolist()) == sorted(keys)
        for pos in supervised:
            assert labels[pos] == pairs[int(inputs[pos])]
        filler_mask = np.ones(64, dtype=bool)
        filler_mask[:c] = False
        filler_mask[supervised] = False
        fillers.extend(inputs[filler_mask].tolist())
    if random_non_queries:
        assert len(set(fillers)) > 100 and min(fillers) >= 0 and max(fillers) < 128
    else:
        assert set(fillers) == {0}


def test_mqar_query_gaps_follow_a_power_law():
    def slot_counts(power_a):
        task = MQAR(vocab_size=512, seq_len=256, num_kv_pairs=4, power_a=power_a)
        counts = np.zeros(task.num_slots, dtype=int)
        for i in range(1500):
            _, labels = sample_at(task, 0, i)
            counts[(np.flatnonzero(labels != IGN) - task.context_size) // 2] += 1
        return counts

    skewed = slot_counts(0.01)  # Zoology's default: p(slot g) ∝ (g + 1)^-0.99
    assert skewed.sum() == 4 * 1500
    assert skewed[:10].sum() > 4 * skewed[-10:].sum()
    assert skewed[0] > skewed[5] > skewed[50:60].mean() > 0
    assert skewed[:30].sum() > skewed[30:].sum() / 2
    uniform = slot_counts(1.0)  # a = 1: uniform over slots
    assert 0.7 < uniform[:10].sum() / uniform[-10:].sum() < 1.4
    p = MQAR(vocab_size=512, seq_len=256, num_kv_pairs=4).gap_probabilities()
    assert np.isclose(p.sum(), 1) and (np.diff(p) < 0).all()


def test_mqar_preconditions():
    with pytest.raises(ValueError, match="even"):
        MQAR(seq_len=63)
    with pytest.raises(ValueError, match="vocab_size"):
        MQAR(vocab_size=64, seq_len=64)
    with pytest.raises(ValueError, match="seq_len"):
        MQAR(seq_len=64, num_kv_pairs=17)
    MQAR(seq_len=64, num_kv_pairs=16)
    with pytest.raises(ValueError):
        MQAR().sample(np.random.default_rng(0), length=32)
    assert MQAR().sample(np.random.default_rng(0), length=64)[0].shape == (64,)
