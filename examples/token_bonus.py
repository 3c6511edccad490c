"""A new token-level method in one module: a fixed bonus on chosen tokens, mixed in by the one loop.

    z[v] = log p(v) / T + w * bonus * [v in token_ids]        then truncation and the draw, as always

The guide says what it adds (`start` returns its state for a batch); the strategy says which guides and
weights to mix. The loop, sessions, seeding, truncation and the Triton kernel come for free.
"""

import torch

from align_decode.decoding import TokenStrategy
from align_decode.decoding.guides import Guide, GuideContext, StaticScores


class TokenBonus(Guide):
    """+bonus on the scores of token_ids, every step, whatever the prefix."""

    name = "token_bonus"

    def __init__(self, token_ids, bonus: float = 1.0):
        self.token_ids, self.bonus = list(token_ids), float(bonus)

    def width_for(self, policy_model, policy_tokenizer) -> int:
        width = len(policy_tokenizer)
        if any(not 0 <= t < width for t in self.token_ids):
            raise ValueError(f"token ids must be in [0, {width}), got {self.token_ids}")
        return width

    def start(self, context: GuideContext) -> StaticScores:
        scores = torch.zeros(context.batch.size, context.width)
        scores[:, self.token_ids] = self.bonus
        return StaticScores(scores)


class KeywordSteer(TokenStrategy):
    """Steer towards token_ids with strength `weight` (0 gives the policy back)."""

    name = "keyword_steer"

    def __init__(self, token_ids, bonus: float = 1.0, weight: float = 1.0):
        self.guide, self.weight = TokenBonus(token_ids, bonus), float(weight)

    def guides(self):
        return [self.guide]

    def mixing(self, settings):
        return settings.temperature, [self.weight]
