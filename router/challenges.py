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
"""

from __future__ import annotations

from collections import Counter

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
MAX_ANSWERS = 64  # answers kept per (model, prompt): the most recent nodes'


def normalise(text: str, words: int) -> str:
    return " ".join(text.lower().split()[:words])


class Challenges:
    def __init__(self, min_nodes: int = 3, words: int = 6, strikes_to_unverify: int = 2) -> None:
        self.min_nodes = min_nodes
        self.words = words
        self.strikes_to_unverify = strikes_to_unverify
        self.answers: dict[tuple[str, str, int], dict[str, str]] = {}
        # node id -> (model, engine, prompt) it disagreed on
        self.strikes: dict[str, set[tuple[str, str, int]]] = {}

    def record(self, model: str, engine: str, prompt: int, node_id: str, text: str) -> None:
        """Keep ``node_id``'s answer and re-judge every node that answered ``prompt``
        for ``model`` on ``engine``."""
        key = (model, engine, prompt)
        answers = self.answers.setdefault(key, {})
        answers.pop(node_id, None)
        answers[node_id] = normalise(text, self.words)
        if len(answers) > MAX_ANSWERS:
            answers.pop(next(iter(answers)))
        if len(answers) < self.min_nodes:
            return
        (top, n), *_ = Counter(answers.values()).most_common(1)
        if 2 * n <= len(answers):
            return  # no strict majority: nothing to judge by
        for nid, answer in answers.items():
            if answer == top:
                self.strikes.get(nid, set()).discard(key)
            else:
                self.strikes.setdefault(nid, set()).add(key)

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

    def forget(self, node_id: str) -> None:
        self.strikes.pop(node_id, None)
        for answers in self.answers.values():
            answers.pop(node_id, None)
