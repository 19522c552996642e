"""Megatron-Core models for Hugging Face architectures (dense Qwen2/Qwen3, Qwen2/Qwen3-MoE)."""
