"""The embedded default (`make demo`): base -> SFT cold start -> GRPO on a CPU, no downloads.

1. a tiny Qwen2-architecture model (random init) and a byte-level BPE tokenizer trained on
   the task's own text, both built locally;
2. SFT on traces of 2-digit addition written by a programmatic solver in the R1
   <think>/<answer> format (examples/recipes/demo/sft.yaml);
3. GRPO from the SFT checkpoint with vLLM rollouts and the math-verify accuracy reward
   (examples/recipes/demo/grpo.yaml), evaluated on 500 held-out problems before and after RL.
It prints the held-out accuracy after each stage and writes outputs/demo/grpo/metrics.png.
Each run starts afresh (`run.overwrite=true`: an earlier demo's outputs are replaced).

    python -m openr1_mega.demo [--out outputs/demo] [--sft sft.epochs=1 ...] [grpo.steps=20 ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

RECIPES = Path(__file__).resolve().parent.parent / "examples" / "recipes" / "demo"
MODEL = dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
             tie_word_embeddings=True)


def build_base_model(out: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny Qwen2 (transformers' init) and the task's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from openr1_mega.data.tasks import task_rows
    from openr1_mega.data.tokenizer import build_tiny_tokenizer

    rows = task_rows("arithmetic", "train", 2000, seed=seed)
    corpus = [f"{r['problem']} {r['solution']}" for r in rows] + ["system user assistant"]
    build_tiny_tokenizer(out, corpus, vocab_size=256)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = AutoConfig.for_model(**MODEL, vocab_size=len(tokenizer),
                                  eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the three stages; returns {"sft_accuracy", "grpo_accuracy"}."""
    from openr1_mega.train import grpo, sft

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--sft", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the SFT recipe (repeatable)")
    parser.add_argument("grpo_overrides", nargs="*", help="dotted.key=value for the GRPO recipe")
    args = parser.parse_args(argv)
    out = Path(args.out)
    base = build_base_model(out / "base")
    sft.main(["--recipe", str(RECIPES / "sft.yaml"), f"model.path={base}",
              f"run.output_dir={out / 'sft'}", "run.overwrite=true", *args.sft])
    final = grpo.main(["--recipe", str(RECIPES / "grpo.yaml"), f"model.path={out / 'sft' / 'hf'}",
                       f"run.output_dir={out / 'grpo'}", "run.overwrite=true",
                       *args.grpo_overrides])
    rows = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    result = {"sft_accuracy": rows[0]["eval/accuracy"], "grpo_accuracy": final["eval/accuracy"],
              "sft_accuracy_greedy": rows[0]["eval/accuracy_greedy"],
              "grpo_accuracy_greedy": final["eval/accuracy_greedy"]}
    print(f"held-out pass@1 (T=0.6, 4 samples)  after SFT: {result['sft_accuracy']:.3f}   "
          f"after GRPO: {result['grpo_accuracy']:.3f}\n"
          f"held-out greedy accuracy            after SFT: {result['sft_accuracy_greedy']:.3f}"
          f"   after GRPO: {result['grpo_accuracy_greedy']:.3f}   "
          f"(plot: {out / 'grpo' / 'metrics.png'})")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
