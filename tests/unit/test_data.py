"""Built-in corpus, packing, and the global sample order."""

import numpy as np

from chimera.configs.schema import DataConfig
from chimera.data.builtin import stdlib_files
from chimera.data.loader import TokenData
from chimera.data.order import GlobalOrder, micro_batch_positions
from chimera.data.packing import PackedSequences
from chimera.data.tokenizers import ByteTokenizer


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo' # ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([104, 105, tok.eos_id, 300]) == "hi\n"


def test_packing_windows_and_labels():
    stream = np.arange(23, dtype=np.uint16)
    packed = PackedSequences(stream, 5)
    assert len(packed) == 4  # (23 - 1) // 5
    x, y = packed.batch([0, 3])
    assert x.tolist() == [[0, 1, 2, 3, 4], [15, 16, 17, 18, 19]]
    assert y.tolist() == [[1, 2, 3, 4, 5], [16, 17, 18, 19, 20]]


def test_order_is_a_seeded_permutation_per_epoch():
    order = GlobalOrder(100, seed=7)
    first, second = order.samples(np.arange(100)), order.samples(np.arange(100, 200))
    assert sorted(first) == list(range(100)) and sorted(second) == list(range(100))
    assert list(first) != list(second)
    assert list(GlobalOrder(100, seed=7).samples(np.arange(100))) == list(first)
    assert list(GlobalOrder(100, seed=8).samples(np.arange(100))) != list(first)


def test_a_step_reads_the_same_samples_at_any_data_parallel_size():
    def step_positions(dp, micro, consumed=40, global_batch=8):
        accumulation = global_batch // (micro * dp)
        return sorted(p for m in range(accumulation) for r in range(dp)
                      for p in micro_batch_positions(consumed, m, r, dp, micro))

    assert step_positions(1, 8) == step_positions(2, 4) == step_positions(4, 1) == list(range(40, 48))


def test_stdlib_corpus_split_is_deterministic():
    data = TokenData(DataConfig(seq_len=128))
    files = stdlib_files()
    assert len(files) > 100
    n_train, n_val = len(data.streams["train"]), len(data.streams["validation"])
    assert n_val > 0.005 * (n_train + n_val) and n_val < 0.05 * (n_train + n_val)
    again = TokenData(DataConfig(seq_len=128))
    assert np.array_equal(again.streams["validation"], data.streams["validation"])
    x, y = data.train_batch(consumed=16, micro_step=0, data_rank=1, data_size=2, micro_batch=4)
    assert x.shape == (4, 128) and (x[:, 1:] == y[:, :-1]).all()
    # byte-level Python source: the unigram entropy lies between 2.5 and 4 nats
    assert 2.5 < data.unigram_cross_entropy() < 4.0
