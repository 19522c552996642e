"""Utilities: metric logging (TensorBoard, JSONL, W&B) and plots."""
