"""Data: tokenizers, chat formatting with loss masks, packing, prompts and built-in tasks."""
