"""Chimera: distributed pretraining for hybrid sequence models.

The repository's top-level folders are the subpackages: ``chimera.models``, ``chimera.parallel``,
``chimera.data``, ``chimera.trainer``, ``chimera.launch``, ``chimera.configs``.
"""

__version__ = "0.1.0"


def load_model(path):
    """Load a trained model for inference: a module whose ``forward(input_ids)`` gives logits [b, s, vocab].

    ``path`` is a run directory (its latest checkpoint is used), one checkpoint directory, or a directory written by
    ``chimera export --format safetensors``.
    """
    from chimera.trainer.checkpoint import load_inference_model

    return load_inference_model(path)


__all__ = ["load_model", "__version__"]
