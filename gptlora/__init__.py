"""gptlora: GPT-2 from scratch in PyTorch, for learning and teaching LLM fine-tuning.

The chapters, one or two modules each, in the order of the notebooks (``notebooks/NN_*.ipynb``) and
exercises (``exercises/NN_*.ipynb``):

==  ====================================  ==============================================================
01  ``model``                             the architecture: ``GPTConfig``, ``GPTModel``, the KV cache
02  ``generation``                        tokenizer, greedy / temperature / top-k sampling, ``generate``
03  ``text_data``, ``pretraining``,       sliding-window data and "The Verdict"; next-token loss, the
    ``training``                          book's loop; the one training loop with appendix D's schedule
04  ``pretrained``                        GPT-2's released weights: download, load, save back
05  ``spam``                              the SMS Spam Collection: splits, datasets, padding
06  ``classifier``                        the class head, loss, accuracy, ``classify``
07  ``lora``                              LoRA injected into any ``nn.Module``: freeze, merge, several adapters
08  ``lora_layer``                        LoRA's maths and DoRA's
09  ``prompt_tuning``, ``p_tuning``,      soft prompts, prefixes, P-tuning's prompt encoder; the ``peft``
    ``peft_tutorials``                    tutorials' models and data
10  ``quantization``, ``qlora``           NF4 and int8 from scratch; a quantized base under LoRA
11  ``instruction_data``,                 the book's chapter 7: Alpaca prompts, the -100 mask, batches;
    ``instruction_scoring``               exact match, token F1 and a judge model
12  ``preference_data``,                  the book's DPO bonus: chosen/rejected batches; answers' log-probs,
    ``preference``                        the DPO loss, rewards, the reference with LoRA's adapters off
==  ====================================  ==============================================================

Underneath, the plumbing, none of it needed to follow a chapter: ``cli`` (the ``gptlora`` command),
``recipes`` (whole runs: fine-tuning, pretraining, instruction tuning, DPO, their settings objects and run
directories), ``formats`` (files in and out: Hugging Face's layout, adapter files, ``peft`` export),
``infra`` (downloads, checkpoints, ``torchrun``, atomic writes, locks, ranges) and ``teaching`` (the
notebooks' parameter cell, the exercises' checks and the grader's probes).
"""

from .model import GPTConfig, GPTModel, count_parameters

__all__ = ["GPTConfig", "GPTModel", "count_parameters"]
__version__ = "0.1.0"
