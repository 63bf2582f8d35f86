"""gptlora: GPT-2 from scratch in PyTorch, for learning and teaching LLM fine-tuning.

One module per stage, in the order a reader meets them:
``model`` (the architecture), ``generation`` (tokenizer and sampling),
``text_data`` and ``pretraining`` (training on a text, with ``training``'s loop),
``pretrained`` (GPT-2 weights) with ``hf_layout`` (Hugging Face's names for
them), ``spam`` (the data set), ``classifier`` (fine-tuning), ``lora``
(low-rank adaptation) and ``cli`` (the ``gptlora`` command).
"""

from .model import GPTConfig, GPTModel, count_parameters

__all__ = ["GPTConfig", "GPTModel", "count_parameters"]
__version__ = "0.1.0"
