"""mmtrain: train vision-language models on frozen LLMs under DeepSpeed ZeRO."""

__version__ = "0.1.0"
