"""Catching model substitution: nodes that claim one model and serve another.

Every probe (:mod:`router.prober`) is a *challenge*: a prompt drawn from
:data:`PROMPTS`, asked greedily (``temperature: 0``), whose answer is kept per
(model, engine, prompt). Greedy decoding of the same weights by the same engine
gives the same text, so nodes serving the same model agree, and a node serving
a smaller model, another model under the claimed name, or garbage disagrees.
Answers are compared within one engine: engines apply chat templates and
sampling defaults of their own, and on the same GGUF llama.cpp's server and
llama-cpp-python's answer differently at temperature 0.

Once at least ``min_nodes`` nodes have answered a prompt and a strict majority
of them gave the same answer (its first ``words`` words, case and spacing
ignored), each node whose answer differs has a *strike* on that prompt; an
agreeing answer clears it. A node with a strike is not verified; a routable node
with ``strikes_to_unverify`` strikes (on different prompts) loses ``verified``.

Limits: it needs ``min_nodes`` nodes per model and engine (fewer are not
checked, so a substitute that presents itself as a rare engine escapes); a
majority of substitutes wins; quantisations of the same model may decode
differently and are then told apart too (compare fewer words); and a node that
recognises probes can answer them honestly.

Memory is bounded whatever nodes claim: at most :data:`MAX_GROUPS` (model,
engine) groups are kept (a new one evicts the least recently answered, with its
answers and the strikes they gave), :data:`MAX_ANSWERS` answers per prompt,
each kept as an 8-byte digest of its first words. A node's answers and strikes
go when it is forgotten (:meth:`Challenges.forget_absent`) or no longer claims
the model or engine (:meth:`Challenges.retain`); a prompt, then a group, that no
node answers any more goes with them. A strike stands only on a kept answer.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Collection, Container
from typing import TypeVar

# Varied everyday prompts: a node cannot tell a probe from a short request by its text.
PROMPTS = (
    "Write one sentence about the sea.",
    "Name three colours of autumn leaves.",
    "What is the capital of Italy? Answer briefly.",
    "Give a short tip for sleeping better.",
    "Describe a cat in five words.",
    "Complete the phrase: an apple a day",
    "Suggest a name for a small bakery.",
    "What is 12 times 7? Reply with the number and one sentence.",
    "Translate 'good morning' into French.",
    "List two uses of a paperclip.",
    "Say something kind about Mondays.",
    "Summarise the water cycle in one sentence.",
    "What do bees make?",
    "Give a synonym for 'happy' and use it in a sentence.",
    "Why is the sky blue? One sentence.",
    "Recommend a board game for four players.",
)
MAX_ANSWERS = 64  # answers kept per (model, engine, prompt): the most recent nodes'
MAX_GROUPS = 512  # (model, engine) groups kept: the most recently answered ones

Key = tuple[str, str, int]  # (model, engine, prompt)
Group = tuple[str, str]  # (model, engine)
T = TypeVar("T")


def normalise(text: str, words: int) -> str:
    return " ".join(text.lower().split()[:words])


def digest(text: str, words: int) -> bytes:
    """What is kept of an answer: 8 bytes, however long the answer, equal for equal
    first words."""
    return hashlib.blake2b(normalise(text, words).encode(), digest_size=8).digest()


class Challenges:
    def __init__(self, min_nodes: int = 3, words: int = 6, strikes_to_unverify: int = 2) -> None:
        self.min_nodes = min_nodes
        self.words = words
        self.strikes_to_unverify = strikes_to_unverify
        # (model, engine) -> prompt -> node id -> answer digest; least recently answered first
        self.groups: OrderedDict[Group, dict[int, dict[str, bytes]]] = OrderedDict()
        self.answered: dict[str, set[Group]] = {}  # node id -> groups it has answers in
        self.strikes: dict[str, set[Key]] = {}  # node id -> keys it disagreed on

    def record(self, model: str, engine: str, prompt: int, node_id: str, text: str) -> None:
        """Keep ``node_id``'s answer and re-judge every node that answered ``prompt``
        for ``model`` on ``engine``."""
        group = (model, engine)
        answers = self._group(group).setdefault(prompt, {})
        answers.pop(node_id, None)
        answers[node_id] = digest(text, self.words)
        self.answered.setdefault(node_id, set()).add(group)
        if len(answers) > MAX_ANSWERS:
            self._drop_answer(group, prompt, next(iter(answers)))
        self._judge((model, engine, prompt), answers)

    def _group(self, group: Group) -> dict[int, dict[str, bytes]]:
        """The answers of ``group``, now the most recently used; a new group beyond
        :data:`MAX_GROUPS` evicts the least recently used."""
        prompts = self.groups.get(group)
        if prompts is not None:
            self.groups.move_to_end(group)
            return prompts
        if len(self.groups) >= MAX_GROUPS:
            self._evict(next(iter(self.groups)))
        prompts = self.groups[group] = {}
        return prompts

    def _judge(self, key: Key, answers: dict[str, bytes]) -> None:
        if len(answers) < self.min_nodes:
            return
        (top, n), *_ = Counter(answers.values()).most_common(1)
        if 2 * n <= len(answers):
            return  # no strict majority: nothing to judge by
        for nid, answer in answers.items():
            if answer != top:
                self.strikes.setdefault(nid, set()).add(key)
            else:
                _discard(self.strikes, nid, key)

    def suspect(self, node_id: str, verified: bool) -> str | None:
        """Why ``node_id`` must not be (or stay) verified, or None."""
        strikes = self.strikes.get(node_id)
        if not strikes:
            return None
        if verified and len(strikes) < self.strikes_to_unverify:
            return None
        models = sorted({m for m, _, _ in strikes})
        return (
            f"its greedy answers to {len(strikes)} challenge prompt(s) disagree with the "
            f"majority of nodes serving {', '.join(models)} (model substitution suspected)"
        )

    def retain(self, node_id: str, engine: str, models: Collection[str]) -> None:
        """Drop ``node_id``'s answers for models it no longer claims, or given under
        another engine."""
        groups = self.answered.get(node_id, ())
        for group in [g for g in groups if g[1] != engine or g[0] not in models]:
            self._leave(group, node_id)

    def forget_absent(self, present: Container[str]) -> None:
        """Forget every node not in ``present`` (the fleet's node ids)."""
        for node_id in [n for n in self.answered if n not in present]:
            self.forget(node_id)

    def forget(self, node_id: str) -> None:
        """Drop ``node_id``'s answers and strikes."""
        for group in list(self.answered.get(node_id, ())):
            self._leave(group, node_id)
        self.strikes.pop(node_id, None)

    def _leave(self, group: Group, node_id: str) -> None:
        """Drop ``node_id``'s answers to ``group``'s prompts, and its strikes there."""
        for prompt in list(self.groups.get(group, ())):
            self._drop_answer(group, prompt, node_id)
        _discard(self.answered, node_id, group)

    def _drop_answer(self, group: Group, prompt: int, node_id: str) -> None:
        """Drop ``node_id``'s answer to ``prompt`` (and its strike there); a prompt and
        then a group left without answers go too."""
        prompts = self.groups.get(group, {})
        answers = prompts.get(prompt, {})
        answers.pop(node_id, None)
        _discard(self.strikes, node_id, (*group, prompt))
        if not any(node_id in a for a in prompts.values()):
            _discard(self.answered, node_id, group)
        if not answers:
            prompts.pop(prompt, None)
        if not prompts:
            self.groups.pop(group, None)

    def _evict(self, group: Group) -> None:
        """Drop a whole group: every node's answers to it, and the strikes they gave."""
        for prompt, answers in self.groups.pop(group).items():
            for node_id in answers:
                _discard(self.strikes, node_id, (*group, prompt))
                _discard(self.answered, node_id, group)


def _discard(index: dict[str, set[T]], node_id: str, item: T) -> None:
    """Take ``item`` from ``node_id``'s set in ``index``; an empty set goes."""
    items = index.get(node_id)
    if items is not None:
        items.discard(item)
        if not items:
            del index[node_id]
