"""The suite names, importable without torch (the CLI's parser lists them)."""

SUITE_NAMES = ["ppl", "mqar", "chomsky", "longctx"]
