"""openr1-mega: the Open-R1 recipe (distill, SFT, GRPO, evaluation) on Megatron-Core.

Importing the package needs only torch: vLLM, Transformer Engine and the compiled
extension `openr1_mega._C` are imported lazily by the modules that use them.
"""

__version__ = "0.1.0"
