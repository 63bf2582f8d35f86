"""Files in and out: Hugging Face's names for GPT-2's tensors (``hf_layout``), the SMS Spam Collection's
file (``spam_file``), LoRA and DoRA adapter files with a base fingerprint (``lora_io``) and their export to
``peft`` (``lora_peft_export``), prompt, prefix and P-tuning files and their export (``prompt_tuning_io``).
"""
