"""Training loops (sft.py, grpo.py) over one shared optimizer step (step.py)."""
