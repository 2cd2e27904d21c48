"""Models that leave the pipeline: Hugging Face export and import (export.py), the fast tokenizer and
chat template (tokenizer.py), the model card (card.py). modeling_nanopipe.py and
configuration_nanopipe.py are the architecture as `transformers` code: they are copied into every
export (trust_remote_code) and import nothing of nanopipe."""
