"""A Chimera model in transformers: ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.

Written into the export directory by Chimera (``chimera export --format hf``, ``chimera.export.remote_code``).
It needs the ``chimera`` package installed (``pip install chimera``): ``ChimeraForCausalLM`` builds
``chimera.models``' own model (``CausalLM``, or the byte-latent model) from the config on one process, so the
exported model computes exactly what Chimera computes. ``chimera.models`` imports neither DeepSpeed nor Megatron.

Decoding keeps each mixer's recurrent state, not a key/value history: the cache (``ChimeraCache``) holds the
state Chimera's ``prefill`` hands over (RG-LRU/SSM/RWKV states, convolution tails, ring buffers of sliding
windows, the key/value cache of global attention) and the position reached. The first call with a cache runs
the prompt in one parallel pass (``prefill``); every later call feeds new tokens one at a time through
``step``. ``generate()`` (greedy or sampling) works with its default settings.

Not supported: padding (an ``attention_mask`` with zeros), beam search and other searches that reorder or crop
the cache, ``inputs_embeds``.
"""

import torch
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_chimera import ChimeraConfig


class ChimeraCache(Cache):
    """The model's decoding state: Chimera's per-layer state (``None`` before the prompt) and the number of tokens
    it has seen (the position of the next one). It holds at most ``max_len`` tokens."""

    is_compileable = False
    is_croppable = False

    def __init__(self, max_len: int):
        super().__init__(layers=[])
        self.max_len = max_len
        self.state = None
        self.position = 0

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def reset(self) -> None:
        self.state, self.position = None, 0

    def _unsupported(self, what: str):
        raise NotImplementedError(f"ChimeraCache: {what} of a recurrent decoding state is not supported; "
                                  "use greedy or sampling generation with one sequence per prompt")

    def reorder_cache(self, beam_idx):
        self._unsupported("reordering (beam search)")

    def crop(self, tokens_to_remove: int):
        self._unsupported("cropping (assisted or speculative decoding)")

    def batch_repeat_interleave(self, repeats: int):
        if self.state is not None:  # before the prompt there is nothing to repeat
            self._unsupported("repeating the batch")

    def batch_select_indices(self, indices):
        if self.state is not None:
            self._unsupported("selecting from the batch")


class ChimeraForCausalLM(PreTrainedModel, GenerationMixin):
    """``self.model``: Chimera's model, built from ``config.chimera`` for one process. Parameter names are
    ``model.`` + Chimera's."""

    config_class = ChimeraConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # the cache is a recurrent state: generate() refuses assisted decoding
    _supports_cache_class = True

    def __init__(self, config: ChimeraConfig):
        super().__init__(config)
        from chimera.models.causal_lm import model_class
        from chimera.models.config import ModelConfig
        from chimera.parallel.sharding import initialize_parameters

        cfg = ModelConfig.model_validate(config.chimera)
        self.model = model_class(cfg)(cfg)
        if not any(p.is_meta for p in self.model.parameters()):  # built for use, not for loading weights into
            initialize_parameters(self.model, seed=0)
        for module in self.model.modules():  # index buffers (built on the CPU even on the meta device)
            values = {name: b.clone() for name, b in module.named_buffers(recurse=False)
                      if name in module._non_persistent_buffers_set and not b.is_meta}
            if values:
                module._chimera_buffer_values = values
        self.post_init()

    def _init_weights(self, module):
        """Weights come from the checkpoint or from Chimera's own initialisation (in ``__init__``); transformers
        replaces the buffers that are no weights by empty tensors when it loads: they get their values back here."""
        for name, value in getattr(module, "_chimera_buffer_values", {}).items():
            getattr(module, name).copy_(value)

    def get_input_embeddings(self):
        return getattr(self.model, "embed", None)

    def get_output_embeddings(self):
        return None  # the head is Chimera's (or the embedding itself, when tied); nothing for transformers to tie

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # a key/value DynamicCache cannot hold a recurrent state: the cache is a ChimeraCache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, *args, **kwargs):
        """generate(): an empty ``ChimeraCache`` for the whole generation (prompt and new tokens), unless the caller
        passed one or turned the cache off."""
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return
        model_kwargs["past_key_values"] = ChimeraCache(max_cache_length + 1)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=True,
                                      **kwargs):
        """Once the cache has seen the prompt, only the newest token goes in."""
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "use_cache": use_cache,
                "attention_mask": attention_mask}

    def forward(self, input_ids: torch.LongTensor, past_key_values: ChimeraCache | None = None,
                use_cache: bool | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, inputs_embeds=None, **kwargs) -> CausalLMOutputWithPast:
        """Logits ``[b, t, V]`` of ``input_ids [b, t]``; with ``use_cache`` (default: ``config.use_cache``) and no
        ``labels``, in eval mode, decoding with the cache: the prompt in one pass, then token by token. Else one
        parallel forward with gradients. ``labels`` (HF convention: the inputs themselves, shifted here, -100
        ignored): the mean next-token loss. ``position_ids`` and other keywords are ignored: positions are the
        cache's."""
        if inputs_embeds is not None:
            raise ValueError("ChimeraForCausalLM takes input_ids, not inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("ChimeraForCausalLM decodes unpadded sequences: the attention_mask must be all ones "
                             "(generate each prompt on its own, or prompts of one length together)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if labels is not None or self.training or not (use_cache or past_key_values is not None):
            logits, past_key_values = self.model(input_ids), None
        else:
            logits, past_key_values = self.decode(input_ids, past_key_values)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    @torch.no_grad()
    def decode(self, input_ids: torch.LongTensor, cache: ChimeraCache | None) -> tuple[torch.Tensor, ChimeraCache]:
        """The logits of ``input_ids`` continuing ``cache`` (a new one if None), which they update."""
        length = input_ids.shape[1]
        if cache is None:
            cache = ChimeraCache(max(self.config.cache_length, length))
        if cache.position + length > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} tokens; {cache.position} + {length} do not fit "
                             "(a larger max_length in generate, or config.cache_length)")
        if cache.state is None:
            logits, cache.state = self.model.prefill(input_ids, cache.max_len)
            cache.position = length
            return logits, cache
        steps = []
        for token in input_ids.unbind(1):
            steps.append(self.model.step(token, cache.state, cache.position))
            cache.position += 1
        return torch.stack(steps, 1), cache
