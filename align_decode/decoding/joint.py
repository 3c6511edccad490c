"""One forward pass for the policy and the guides that are the same model.

A prompted ARM is often the policy itself reading another prompt. Its rows and the policy's rows then
go through the same weights each step, so they can share one batched forward: on a memory-bound device
(a CPU, or a GPU at small batch) reading the weights once for both costs about what one forward costs.
The rows stay independent: each keeps its own cache columns, mask and positions, so the scores are those
of separate forwards (up to floating-point batching noise).

`fuse_same_model` stacks the policy session's rows and those guides' rows into one session and hands the
loop a policy view and guide views over it; the loop does not know the difference.
"""

from __future__ import annotations

import torch

from .session import ModelSession


class _JointPolicy:
    """The policy's rows of a joint session, as the loop sees the policy session."""

    def __init__(self, joint: ModelSession, groups: int):
        self.joint, self.groups = joint, groups
        self.guide_scores: list[torch.Tensor] = []

    @property
    def batch_size(self) -> int:
        return self.joint.batch_size // self.groups

    @property
    def forward_tokens(self) -> int:
        return self.joint.forward_tokens

    def step(self, tokens: torch.Tensor, advance: torch.Tensor | None = None) -> torch.Tensor:
        b = self.batch_size
        adv = None if advance is None else advance.repeat(self.groups)
        logits = self.joint.step(tokens.repeat(self.groups), adv)
        self.guide_scores = [logits[g * b:(g + 1) * b] for g in range(1, self.groups)]
        return logits[:b]

    def select(self, index: torch.Tensor) -> None:
        b = self.batch_size
        self.joint.select(torch.cat([index + g * b for g in range(self.groups)]))

    def fork(self, index):
        raise NotImplementedError("a joint policy/guide session cannot park rows")


class _JointGuide:
    """One fused guide's rows: scores come from the policy view's last forward."""

    def __init__(self, policy: _JointPolicy, group: int, scores: torch.Tensor):
        self.policy, self.group, self.scores = policy, group, scores

    def next_scores(self, policy_logits: torch.Tensor) -> torch.Tensor:
        if self.policy.guide_scores:
            self.scores = self.policy.guide_scores[self.group - 1]
        return self.scores

    def advance(self, tokens: torch.Tensor, advance: torch.Tensor | None = None) -> None:
        pass  # the policy view's step already fed these rows

    def select(self, index: torch.Tensor) -> None:
        pass  # the policy view's select already kept these rows


def fuse_same_model(session: ModelSession, states: list) -> tuple[object, list]:
    """(policy session or view, guide states or views): guide states that allow it (`fusable`, a model's
    next-token scores kept in `scores`) whose session runs the policy's model with the same vocabulary
    width on the same device are fused into one session with the policy."""
    fusable = [i for i, s in enumerate(states)
               if getattr(s, "fusable", False) and isinstance(getattr(s, "session", None), ModelSession)
               and s.session.model is session.model and s.session.vocab_size == session.vocab_size]
    if not fusable:
        return session, states
    try:
        joint = ModelSession.concat([session] + [states[i].session for i in fusable])
    except TypeError:
        # Caches that cannot be merged row-wise (sliding-window layers): keep separate forwards.
        return session, states
    view = _JointPolicy(joint, 1 + len(fusable))
    out = list(states)
    for group, i in enumerate(fusable, 1):
        out[i] = _JointGuide(view, group, states[i].scores)
    return view, out
