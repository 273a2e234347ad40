"""The transformers configuration of a Chimera model exported with ``chimera export --format hf``.

Written into the export directory by Chimera (``chimera.export.remote_code``); transformers loads it with
``trust_remote_code=True``. The whole Chimera model config travels in ``chimera`` (a dict, as Chimera's run files
spell it); ``ChimeraForCausalLM`` (``modeling_chimera.py``) builds the model from it with the installed ``chimera``
package.
"""

from transformers import PretrainedConfig


class ChimeraConfig(PretrainedConfig):
    """``chimera``: Chimera's model config (``chimera.models.config.ModelConfig``, as a dict).
    ``cache_length``: how many tokens the decoding state holds when ``forward`` makes the cache itself
    (``generate`` sizes it to its ``max_length``). ``use_cache``: whether ``forward`` decodes with the cache by
    default."""

    model_type = "chimera"

    def __init__(self, chimera: dict | None = None, cache_length: int = 2048, use_cache: bool = True,
                 **kwargs):
        self.chimera = dict(chimera or {})
        self.cache_length = cache_length
        self.use_cache = use_cache
        self.vocab_size = self.chimera.get("vocab_size")
        kwargs.setdefault("tie_word_embeddings", False)  # a tied Chimera model has no head: nothing to tie here
        super().__init__(**kwargs)
