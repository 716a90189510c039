"""Peak-EWMA latency estimate (Finagle's ``PeakEwma``, tower's ``load::peak_ewma``).

An exponentially weighted moving average that is *pessimistic*: a sample slower
than the current estimate replaces it at once (the "peak"), while faster samples
pull it down gradually with time constant ``tau``::

    w        = exp(-(now - stamp) / tau)
    estimate = sample                          if sample > estimate
             = estimate * w + sample * (1 - w) otherwise

Reading the estimate also decays it toward zero with the same constant, without
mutating it, so a node that was slow a while ago and has since received no
traffic is eventually tried again. A node that was never measured reports the
configured default (see ``NodeStats.cost`` for how new nodes are treated).

The cost used by load-aware policies is ``estimate * (in_flight + 1)``: the
expected wait of one more request queued behind the ones already sent.
"""

from __future__ import annotations

import math


class PeakEwma:
    __slots__ = ("default", "estimate", "stamp", "tau")

    def __init__(self, tau_s: float, default_s: float) -> None:
        self.tau = tau_s
        self.default = default_s
        self.estimate = -1.0  # < 0: never measured
        self.stamp = 0.0

    def observe(self, sample_s: float, now: float) -> None:
        est = self.estimate
        if est < 0.0 or sample_s > est:
            self.estimate = sample_s
        else:
            w = math.exp(-(now - self.stamp) / self.tau)
            self.estimate = est * w + sample_s * (1.0 - w)
        self.stamp = now

    def value(self, now: float) -> float:
        est = self.estimate
        if est < 0.0:
            return self.default
        elapsed = now - self.stamp
        if elapsed <= 0.0:
            return est
        return est * math.exp(-elapsed / self.tau)
