"""chimera.data: tokenizers, prepared datasets, streaming sources, packing, curriculum, synthetic tasks."""

IGNORE_INDEX = -100  # a label that takes no part in the loss (the model's and every data path's convention)
