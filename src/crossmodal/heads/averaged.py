"""A head that averages the probabilities of several trained heads on the same frozen features.

Two uses, one module:
- seed bagging (``train.seeds: K``): K copies of one head trained from K seeds, equal weights; it keeps the
  member's name (``init_args["seeds"] == K``) and is rebuilt by ``build_head(name, ..., seeds=K)``;
- the ``ensemble`` head: ``crossmodal.training.ensemble`` picks members among the trained heads; ``weights`` are
  equal (the heads tied with the best) or their shares of greedy picks with replacement.

``forward`` returns ``log(sum_k w_k softmax(member_k))``, so ``softmax(forward(...))`` is the averaged
probabilities, an argmax-preserving logit like every head's. Every member reads the same (image, text) features,
so the served model still runs one pair of encoders.
"""

from __future__ import annotations

import torch
from torch import nn


class AveragedHead(nn.Module):
    def __init__(self, members: list[nn.Module], weights: list[float], init_args: dict):
        super().__init__()
        if not members or len(members) != len(weights):
            raise ValueError(f"an averaged head needs members and one weight each, got {len(members)} and "
                             f"{len(weights)}")
        total = float(sum(weights))
        if not total > 0 or min(weights) < 0:
            raise ValueError(f"member weights must be non-negative with a positive sum, got {weights}")
        self.members = nn.ModuleList(members)
        self.register_buffer("log_weights", torch.log(torch.tensor([w / total for w in weights], dtype=torch.float32)))
        self.init_args = init_args
        kinds = {m.modality for m in members}
        self.modality = kinds.pop() if len(kinds) == 1 else "fusion"
        self.name = init_args["name"]
        self.has_gates = all(getattr(m, "has_gates", False) for m in members)
        self.decides_missing_alone = all(getattr(m, "decides_missing_alone", False) for m in members)

    @classmethod
    def seed_bag(cls, members: list[nn.Module]) -> AveragedHead:
        """K copies of one head (trained from K seeds), equal weights; saved under the head's own name with
        ``init_args["seeds"] = K``, which ``crossmodal.heads.registry.build_head`` rebuilds."""
        return cls(members, [1.0] * len(members), {**members[0].init_args, "seeds": len(members)})

    def forward(self, image: torch.Tensor, text: torch.Tensor, return_gates: bool = False):
        parts, gates = [], []
        for k, member in enumerate(self.members):
            if return_gates:
                logits, gate = member(image, text, return_gates=True)
                gates.append(gate * self.log_weights[k].exp())
            else:
                logits = member(image, text)
            parts.append(self.log_weights[k] + torch.log_softmax(logits, dim=1))
        out = torch.logsumexp(torch.stack(parts), dim=0)
        return (out, torch.stack(gates).sum(0)) if return_gates else out
