"""PyTorch reference for the ReSET rule, in the reference implementation's shape.

Written from ``shared/docs/reset-algorithm.md``: one Python object per request,
called once per token on the host, Python floats and lists, a ``.item()`` per
entropy. It is deliberately unbatched and unoptimised so that it reads like the
rule; the JAX port is tested against it decision for decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch


def torch_entropy(logits: torch.Tensor) -> float:
    """``-(p * log(clamp(p, 1e-10))).sum()`` in float32, returned as a Python float.

    Args:
      logits: ``[V]`` raw logits.
    """
    p = torch.softmax(logits.float(), dim=-1)
    return (-(p * torch.log(torch.clamp(p, min=1e-10))).sum()).item()


def _mean(values: Sequence[float]) -> float:
    # An explicit left-to-right loop rather than sum(): since Python 3.12 sum()
    # of floats is compensated, which would round mean(window) differently from
    # the plain running total behind H_bar and break the tie the rule relies on.
    s = 0.0
    for v in values:
        s += v
    return s / len(values)


@dataclass
class Decision:
    """What the reference decided at one position (Python floats and bools)."""

    entropy: float
    temperature: float
    boundary: bool
    h_step: float
    h_bar: float
    uncertain: bool
    tau: float
    from_step: bool  # H_step was mean(step) (else mean(window), or H at the start)


@dataclass
class TorchReSETRequest:
    """Per-request ReSET state, stepped once per generated token."""

    t_high: float
    t_low: float
    tau0: float
    window_size: int
    nl_ids: frozenset[int]
    dnl_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    step: list[float] = field(default_factory=list)
    window: list[float] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    @classmethod
    def create(
        cls,
        *,
        t_high: float,
        t_low: float,
        tau0: float,
        window: int,
        nl_ids: Iterable[int],
        dnl_ids: Iterable[int],
    ) -> TorchReSETRequest:
        return cls(
            float(t_high),
            float(t_low),
            float(tau0),
            int(window),
            frozenset(int(i) for i in nl_ids),
            frozenset(int(i) for i in dnl_ids),
        )

    def _ends_step(self) -> bool:
        if len(self.tokens) >= 1 and self.tokens[-1] in self.dnl_ids:
            return True
        return (
            len(self.tokens) >= 2
            and self.tokens[-1] in self.nl_ids
            and self.tokens[-2] in self.nl_ids
        )

    def decide(self, logits: torch.Tensor) -> Decision:
        """Temperature for the next token from its raw logits ``[V]``."""
        boundary = self._ends_step()
        if boundary:
            self.step = []
        h = torch_entropy(logits)

        from_step = len(self.step) >= self.window_size
        if not from_step:
            h_step = _mean(self.window) if self.window else h
        else:
            h_step = _mean(self.step)
        h_bar = self.total / self.n if self.n else h_step
        uncertain = h_step > h_bar
        tau = h_step if uncertain else self.tau0
        temperature = self.t_high if h >= tau else self.t_low

        self.step.append(h)
        self.window.append(h)
        if len(self.window) > self.window_size:
            self.window.pop(0)
        self.total += h
        self.n += 1
        return Decision(h, temperature, boundary, h_step, h_bar, uncertain, tau, from_step)

    def observe(self, token: int) -> None:
        self.tokens.append(int(token))


def reference_replay(logits: torch.Tensor, tokens: Sequence[int], **config) -> list[Decision]:
    """Runs one request over recorded logits ``[T, V]`` and tokens ``[T]``."""
    request = TorchReSETRequest.create(**config)
    out = []
    for z, tok in zip(logits, tokens):
        out.append(request.decide(z))
        request.observe(int(tok))
    return out
