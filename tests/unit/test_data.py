"""Built-in corpus, token streams, global order, a step's sequences and curriculum."""

import numpy as np
import pytest

from chimera.configs.schema import Curriculum, DataConfig
from chimera.data.builtin import stdlib_files
from chimera.data.curriculum import SeqLenSchedule
from chimera.data.loader import DataPipeline
from chimera.data.sources import DocumentSource
from chimera.data.stream import TokenStream
from chimera.data.tokenizers import ByteTokenizer, DNATokenizer, InvalidSymbol


class ListSource(DocumentSource):
    def __init__(self, docs, eos=99):
        self.name, self.eos_id, self.vocab_size = "list", eos, 100
        self.docs = [np.asarray(d, dtype=np.int64) for d in docs]
        self.lengths = np.array([len(d) for d in docs])
        self.groups = [np.arange(len(docs))]

    def read(self, i):
        return self.docs[i]


def test_byte_and_dna_tokenizers():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo' # ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([104, 105, tok.eos_id, 300]) == "hi\n"
    dna = DNATokenizer()
    assert dna.encode("ACGTNacgtn").tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    with pytest.raises(InvalidSymbol) as e:
        dna.encode("ACGXT")
    assert e.value.offset == 3 and e.value.char == "X"


def test_stream_windows_cross_documents_and_epochs():
    src = ListSource([[1, 2, 3], [4, 5], [6]])  # stream per epoch: 9 tokens with separators
    stream = TokenStream(src, src.groups, seed=0, shuffle=False)
    assert stream.epoch_tokens == 9
    w = stream.window(0, 12)
    assert w.tokens.tolist() == [1, 2, 3, 99, 4, 5, 99, 6, 99, 1, 2, 3]
    assert w.sample_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # epoch 1 -> ids 3..5
    assert w.offsets.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2]
    assert w.segments().tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert stream.window(5, 3).tokens.tolist() == [5, 99, 6]
    assert stream.started_samples(0, 9) == [0, 1, 2] and stream.started_samples(1, 10) == [1, 2, 3]


def test_shuffled_order_is_a_seeded_permutation_of_groups_then_documents():
    src = ListSource([[i] for i in range(40)])
    src.groups = [np.arange(i, i + 10) for i in range(0, 40, 10)]
    a, b = TokenStream(src, src.groups, seed=3), TokenStream(src, src.groups, seed=3)
    docs0, _ = a.order(0)
    assert sorted(docs0.tolist()) == list(range(40))
    assert docs0.tolist() == b.order(0)[0].tolist() != a.order(1)[0].tolist()
    assert len({int(d) // 10 for d in docs0[:10]}) == 1  # a group is read together


def test_a_step_reads_the_same_sequences_at_any_data_parallel_size():
    data = DataPipeline(DataConfig(seq_len=32), micro_batch_size=2, global_batch_size=8)
    plan = data.plan(3, {"sequences": 24, "cursors": {"builtin": 24 * 32}})
    def rows(dp, micro):
        data.schedule.tokens_per_micro = micro * 32
        plan.rows = micro
        return sorted(tuple(r.tolist()) for rank in range(dp) for mb in data.micro_batches(plan, rank, dp)
                      for r in mb["input_ids"])
    assert rows(1, 8) == rows(2, 4) == rows(4, 2) == rows(8, 1)
    assert plan.next_state == {"sequences": 32, "cursors": {"builtin": 32 * 32}}


def test_curriculum_stages_and_ramp_keep_tokens_per_step():
    stages = SeqLenSchedule(1024, 256, Curriculum(stages=[[0, 64], [10, 128], [20, 256]]))
    assert [stages.at(s) for s in (0, 9, 10, 19, 20, 99)] == [64, 64, 128, 128, 256, 256]
    assert [stages.rows(s) for s in (0, 10, 20)] == [16, 8, 4]
    ramp = SeqLenSchedule(1024, 256, Curriculum(ramp={"start": 64, "end": 256, "steps": 100}))
    lengths = [ramp.at(s) for s in range(0, 120, 10)]
    assert lengths[0] == 64 and lengths[-1] == 256 and lengths == sorted(lengths)
    assert all(1024 % n == 0 and n * ramp.rows(s) == 1024 for s, n in zip(range(0, 120, 10), lengths))


def test_stdlib_corpus_split_is_deterministic():
    files = stdlib_files()
    assert len(files) > 100
    data = DataPipeline(DataConfig(seq_len=128), micro_batch_size=4, global_batch_size=8)
    src = data.streams[0]
    n_train, n_val = src.train.epoch_tokens, src.validation.epoch_tokens
    assert 0.005 * (n_train + n_val) < n_val < 0.05 * (n_train + n_val)
    again = DataPipeline(DataConfig(seq_len=128), micro_batch_size=4, global_batch_size=8)
    assert np.array_equal(again.streams[0].validation.order(0)[0], src.validation.order(0)[0])
    batch = data.micro_batches(data.plan(0, data.initial_state()), 1, 2)[0]
    x, y = batch["input_ids"], batch["labels"]
    assert x.shape == (4, 128) and (x[:, 1:] == y[:, :-1]).all()
    # byte-level Python source: the unigram entropy lies between 2.5 and 4 nats
    assert 2.5 < data.unigram_cross_entropy() < 4.0
