"""A head that averages the probabilities of several trained heads on the same frozen features, and the one
definition of how members' probabilities are pooled (:func:`pool_log_proba`, :func:`pool_probabilities`), which
the ensembles with members on other inputs share, with their recorded mix (:class:`EnsembleChoice`).

Two uses of the head, one module:
- seed bagging (``train.seeds: K``): K copies of one head trained from K seeds, equal weights; it keeps the
  member's name (``init_args["seeds"] == K``) and is rebuilt by ``build_head(name, ..., seeds=K)``;
- the ``ensemble`` head: ``crossmodal.training.ensemble`` picks members among the trained heads; ``weights`` are
  equal (the heads tied with the best) or their shares of greedy picks with replacement.

Two poolings (``POOLINGS``), each member first at its own ``temperature``:
- ``mean``: ``sum_k w_k p_k``, the average of the probabilities;
- ``log_mean``: ``softmax(sum_k w_k log p_k)``, the normalised weighted geometric mean (a product of experts):
  a class that one calibrated member finds unlikely stays unlikely, where the mean would only halve it.

``forward`` returns the pooled log-probabilities, so ``softmax(forward(...))`` is the pooled probabilities, an
argmax-preserving logit like every head's. Every member reads the same (image, text) features, so the served model
still runs one pair of encoders.

    from crossmodal.heads.averaged import pool_probabilities
    proba = pool_probabilities([p_gated, p_late], [0.5, 0.5], temperatures=[1.3, 0.9], pooling="log_mean")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

POOLINGS = ("mean", "log_mean")


def pool_log_proba(logits: torch.Tensor, weights: torch.Tensor, temperatures: torch.Tensor,
                   pooling: str = "mean") -> torch.Tensor:
    """Pooled log-probabilities (N, C) of K members' ``logits`` (K, N, C; log-probabilities work the same), each
    divided by its temperature first; ``weights`` (K,) sum to 1."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose from {list(POOLINGS)}")
    shape = (-1, 1, 1)
    members = torch.log_softmax(logits / temperatures.to(logits.dtype).view(shape), dim=2)
    w = weights.to(logits.dtype)
    if pooling == "mean":
        return torch.logsumexp(torch.log(w).view(shape) + members, dim=0)
    return torch.log_softmax((w.view(shape) * members).sum(0), dim=1)


def pool_probabilities(probas: Sequence[np.ndarray], weights: Sequence[float],
                       temperatures: Sequence[float] | None = None, pooling: str = "mean") -> np.ndarray:
    """The members' probabilities (each (N, C)) pooled as :class:`AveragedHead` pools its members' logits; float32.
    ``weights`` are normalised to sum to 1; ``temperatures`` default to 1."""
    if not probas or len(probas) != len(weights):
        raise ValueError(f"pooling needs members and one weight each, got {len(probas)} and {len(weights)}")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    t = torch.ones(len(probas), dtype=torch.float64) if temperatures is None else torch.tensor(
        [float(x) for x in temperatures], dtype=torch.float64)
    # Saved probabilities are float32: an underflowed 0 is read as the smallest float32, not as log 0 = -inf.
    floor = float(np.finfo(np.float32).tiny)
    logs = torch.from_numpy(np.log(np.clip(np.stack([np.asarray(p, dtype=np.float64) for p in probas]), floor, None)))
    return pool_log_proba(logs, w / w.sum(), t, pooling).exp().numpy().astype(np.float32)


@dataclass(frozen=True)
class EnsembleChoice:
    """An ensemble's members by name and how they are pooled: ``weights`` summing to 1, each member's
    ``temperatures``, and the ``pooling`` (``POOLINGS``). Chosen by ``crossmodal.training.ensemble``; written into
    ``head.json`` (:meth:`init_args`) and read back by the served model (:meth:`from_init_args`)."""

    weights: dict[str, float]
    temperatures: dict[str, float]
    pooling: str = "mean"

    def pool(self, probas: dict[str, np.ndarray]) -> np.ndarray:
        """The ensemble's probabilities from its members' (``probas`` by name; others are ignored)."""
        return pool_probabilities([probas[n] for n in self.weights], list(self.weights.values()),
                                  [self.temperatures[n] for n in self.weights], self.pooling)

    def init_args(self) -> dict:
        """What a saved ensemble records of its mix (``head.json``'s ``init_args``)."""
        return {"members": dict(self.weights), "temperatures": dict(self.temperatures), "pooling": self.pooling}

    @classmethod
    def from_init_args(cls, args: dict) -> EnsembleChoice:
        """The mix :meth:`init_args` recorded; an ensemble saved before temperatures and pooling were recorded is
        the plain average at T = 1."""
        weights = {n: float(w) for n, w in args["members"].items()}
        recorded = args.get("temperatures") or {}
        return cls(weights, {n: float(recorded.get(n, 1.0)) for n in weights}, args.get("pooling", "mean"))


class AveragedHead(nn.Module):
    def __init__(self, members: list[nn.Module], weights: list[float], init_args: dict,
                 temperatures: list[float] | None = None, pooling: str = "mean"):
        super().__init__()
        if not members or len(members) != len(weights):
            raise ValueError(f"an averaged head needs members and one weight each, got {len(members)} and "
                             f"{len(weights)}")
        total = float(sum(weights))
        if not total > 0 or min(weights) < 0:
            raise ValueError(f"member weights must be non-negative with a positive sum, got {weights}")
        temperatures = [1.0] * len(members) if temperatures is None else [float(t) for t in temperatures]
        if len(temperatures) != len(members) or not min(temperatures) > 0:
            raise ValueError(f"an averaged head needs one positive temperature per member, got {temperatures}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {list(POOLINGS)}")
        self.members = nn.ModuleList(members)
        self.register_buffer("log_weights", torch.log(torch.tensor([w / total for w in weights], dtype=torch.float32)))
        # Not persistent: rebuilt from init_args, so heads saved before temperatures existed still load.
        self.register_buffer("temperatures", torch.tensor(temperatures, dtype=torch.float32), persistent=False)
        self.pooling = pooling
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
            parts.append(logits)
        out = pool_log_proba(torch.stack(parts), self.log_weights.exp(), self.temperatures, self.pooling)
        return (out, torch.stack(gates).sum(0)) if return_gates else out
