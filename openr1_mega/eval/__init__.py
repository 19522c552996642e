"""Benchmark evaluation: pass@1 over n samples, pass@k and maj@k with vLLM and math-verify.

CLI: `python -m openr1_mega.eval --model <hf dir> --tasks math500,aime24,aime25,gsm8k`.
In training: `evaluate(engine, tokenizer, load_task("math500", limit=100), sampling)`.
"""

from openr1_mega.eval.run import Sample, evaluate, format_table, score_completions
from openr1_mega.eval.scoring import ScoringConfig
from openr1_mega.eval.tasks import TASKS, TaskData, load_task

__all__ = ["TASKS", "Sample", "ScoringConfig", "TaskData", "evaluate", "format_table",
           "load_task", "score_completions"]
