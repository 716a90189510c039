"""What Ballast knows about each node: the measurement layer.

Everything measured about a node lives here, apart from who the nodes are
(:mod:`router.fleet`) and which node gets a request (:mod:`policies`):

* :mod:`.outcome`: how one attempt on a node ended;
* :mod:`.peak_ewma` and :mod:`.decayed_ratio`: the estimators;
* :mod:`.stats`: :class:`NodeStats`, one node's scoreboard, and the one rule for
  a node that looks hung;
* :mod:`.attempt`: :class:`Meter` opens an :class:`Attempt` per try on a node and
  owns its lifecycle (begin, first byte, end); every outcome reaches the health
  monitor and the state store through one channel, :class:`Signals`;
* :mod:`.merge`: the merge of a batch of outcomes into shared counters, in
  Python and in the Lua that Redis runs, side by side;
* :mod:`.engine`: load as a node's inference engine reports it in ``/metrics``.

Nothing here does I/O, and every function takes ``now``: tests run on a fake
clock.
"""

from router.measure.attempt import Attempt, Meter, Signals
from router.measure.engine import EngineLoad, parse_engine_metrics
from router.measure.outcome import FAILURES, Outcome
from router.measure.stats import NodeStats, Pending

__all__ = [
    "FAILURES",
    "Attempt",
    "EngineLoad",
    "Meter",
    "NodeStats",
    "Outcome",
    "Pending",
    "Signals",
    "parse_engine_metrics",
]
