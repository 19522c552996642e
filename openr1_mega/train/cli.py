"""The command line the training entry points (grpo.py, sft.py) share."""

from __future__ import annotations

import argparse


def parse_entry_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """--recipe, --resume, --dry-run, --world-size and dotted.key=value overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--recipe", required=True, help="YAML recipe (examples/recipes/...)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in run.output_dir")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the recipe's layout, print per-rank parameters and "
                             "the plan, build nothing")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: ranks to plan for (default $WORLD_SIZE, else "
                             "the smallest world the layout fits)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value recipe overrides")
    return parser.parse_args(argv)
