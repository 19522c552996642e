"""Reinforcement learning with verifiable rewards: rewards, advantages, losses, rollout."""
