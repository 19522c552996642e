"""Verifiable rewards, chosen by name: `get_reward("accuracy", workers=2)`.

Each family module registers its rewards on import (see registry.py for the signature);
combine.py sums them with weights for the trainer.
"""

from openr1_mega.rl.rewards import code, format, length, reasoning, repetition  # noqa: F401
from openr1_mega.rl.rewards.accuracy import score_accuracy, verify_answer
from openr1_mega.rl.rewards.combine import RewardSet, compute_rewards
from openr1_mega.rl.rewards.registry import (
    Reward,
    get_reward,
    register,
    reward_names,
    reward_params,
)

__all__ = ["Reward", "RewardSet", "compute_rewards", "get_reward", "register", "reward_names",
           "reward_params", "score_accuracy", "verify_answer"]
