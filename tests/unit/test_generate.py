"""Generation (``chimera.inference.generate``): one-pass prefill gives the tokens of stepping through the prompt token
by token (the earlier loop, the reference here); prompts of different lengths decoded together each get the tokens
they get alone; text comes out in whole UTF-8 characters and ends before a stop string."""

import pytest
import torch

from chimera.data.tokenizers import ByteTokenizer
from chimera.inference.generate import Sampling, TextStream, generate, sample_next, sampling_problem, stream_completions
from helpers import build_model

NEW = 12


def generate_stepping(model, prompt, max_new_tokens, *, temperature, top_k=None, top_p=None, vocab_limit=None,
                      seed=0):
    """The reference: the prompt fed one token at a time through ``step``, then sampling (the earlier loop)."""
    b, s0 = prompt.shape
    state = model.init_state(b, s0 + max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    tokens, logits = prompt, None
    for pos in range(s0):
        logits = model.step(prompt[:, pos], state, pos)
    for pos in range(s0, s0 + max_new_tokens):
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if pos + 1 < s0 + max_new_tokens:
            logits = model.step(nxt, state, pos)
    return tokens


@pytest.mark.parametrize("preset", ["griffin-tiny", "transformer-tiny", "mamba-tiny", "hyena-tiny"])
def test_one_pass_prefill_equals_stepping(single_process, preset):
    model = build_model(preset).eval()
    prompt = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
    expected = generate_stepping(model, prompt, NEW, temperature=0, vocab_limit=257)
    assert torch.equal(generate(model, prompt, NEW, temperature=0, vocab_limit=257), expected)
    # sampling from one seed: the same draws, hence the same tokens
    sampled = generate_stepping(model, prompt[:1], NEW, temperature=0.9, top_k=40, vocab_limit=257, seed=7)
    assert torch.equal(generate(model, prompt[:1], NEW, temperature=0.9, top_k=40, vocab_limit=257, seed=7), sampled)


@pytest.mark.parametrize("preset", ["griffin-tiny", "transformer-tiny", "hyena-tiny", "zamba-tiny"])
def test_prompts_of_different_lengths_each_get_their_own_tokens(single_process, preset):
    """Greedy: each prompt of a batch (lengths 3, 21, 9; 21 wraps the tiny window of 16) gets exactly the tokens it
    gets decoded alone."""
    model = build_model(preset).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 21, 9)]
    done = {i: c for i, _, c in stream_completions(model, ByteTokenizer(), prompts, NEW, Sampling(0.0)) if c}
    for i, ids in enumerate(prompts):
        alone = generate(model, torch.tensor([ids]), NEW, temperature=0, vocab_limit=257)[0, len(ids):].tolist()
        assert done[i].tokens == alone, (preset, i)
        assert done[i].finish_reason == "length"


def test_stream_pieces_are_whole_characters_and_join_to_the_text():
    text = "héllo wörld €10 ✓ done"
    stream = TextStream(ByteTokenizer().decode)
    pieces = [stream.push(b) for b in text.encode()] + [stream.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert pieces[text.encode().index("é".encode()) + 1] == "é"  # given out once its second byte came


def test_stop_string_cuts_the_text_and_nothing_of_it_is_streamed():
    stream = TextStream(ByteTokenizer().decode, stop=("STOP", "\n\n"))
    pieces = []
    for b in b"one STAR, then STOP and more":
        pieces.append(stream.push(b))
        if stream.stopped:
            break
    assert stream.stopped and stream.text == "one STAR, then "
    assert "".join(pieces) == "one STAR, then "
    # "ST" waited until "A" showed it was no stop string
    assert pieces[b"one ST".index(b"T")] == "" and "ST" in pieces[len(b"one STA") - 1]


def test_stop_strings_through_completions(single_process):
    model = build_model("hawk-tiny").eval()
    (plain,) = [c for _, _, c in stream_completions(model, ByteTokenizer(), [list(b"abc")], 20, Sampling(0.0)) if c]
    stop = plain.text[5:7]  # a stop string the greedy text contains
    first = plain.text.find(stop)
    (cut,) = [c for _, _, c in stream_completions(model, ByteTokenizer(), [list(b"abc")], 20, Sampling(0.0),
                                                  stop=(stop,)) if c]
    assert cut.finish_reason == "stop" and cut.text == plain.text[:first]


@pytest.mark.parametrize(("settings", "message"), [
    ((0, 1.0, None, None), "max_new_tokens 0: must be at least 1"),
    ((5, -0.5, None, None), "temperature -0.5: must be >= 0 (0 is greedy)"),
    ((5, 1.0, -3, None), "top_k -3: must be at least 1 (or leave it out: no top-k filter)"),
    ((5, 1.0, None, 0), "top_p 0: must be in (0, 1]"),
    ((5, 1.0, None, 1.5), "top_p 1.5: must be in (0, 1]"),
    ((5, "hot", None, None), "temperature 'hot': must be a number"),
    ((2.5, 1.0, None, None), "max_new_tokens 2.5: must be a whole number"),
])
def test_sampling_problems(settings, message):
    assert sampling_problem(*settings) == message
    assert sampling_problem(5, 0.0, 3, 0.9) is None
