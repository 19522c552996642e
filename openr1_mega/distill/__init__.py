"""Distillation data: sample reasoning traces from a teacher with vLLM, keep the verified ones.

CLI: `python -m openr1_mega.distill generate|filter ...` (see distill/__main__.py).
"""

from openr1_mega.distill.filter import filter_traces
from openr1_mega.distill.generate import EngineSettings, GenerateConfig, generate_traces

__all__ = ["EngineSettings", "GenerateConfig", "filter_traces", "generate_traces"]
