"""Rewards: sequence-level rewards, token-level guides and their trainers."""

from .base import SequenceReward
from .guides import ARM, LMGuide, PromptedARM

__all__ = ["SequenceReward", "ARM", "LMGuide", "PromptedARM"]
