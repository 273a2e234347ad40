"""What ``chimera generate`` prints: one prompt's text streamed to the terminal as it is made; several prompts
(decoded as one batch) each printed whole, in order, as soon as it and those before it are done."""

from __future__ import annotations

import sys

from chimera.inference.generate import Sampling, stream_completions


def print_generations(model, tokenizer, prompts: list[list[int]], args, out=None) -> None:
    out = out or sys.stdout
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    pieces = stream_completions(model, tokenizer, prompts, args.max_new_tokens, sampling, seed=args.seed,
                                stop=tuple(args.stop))
    if len(prompts) == 1:
        out.write(tokenizer.decode(prompts[0]))
        out.flush()
        for _, text, _ in pieces:
            out.write(text)
            out.flush()
        out.write("\n")
        return
    done, shown = {}, 0
    for index, _, completion in pieces:
        if completion is None:
            continue
        done[index] = completion
        while shown in done:
            out.write(f"--- prompt {shown + 1} of {len(prompts)} ---\n")
            out.write(tokenizer.decode(prompts[shown]) + done.pop(shown).text + "\n")
            out.flush()
            shown += 1
