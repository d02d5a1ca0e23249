"""Grading by a known label hierarchy, with no LLM.

Taxonomy file format (JSON), one tree, or a list of trees for a forest:

    {"name": "bird", "synonyms": ["aves"], "children": [
        {"name": "warbler", "children": [
            {"name": "golden-winged warbler", "synonyms": ["vermivora chrysoptera"]},
            {"name": "blue-winged warbler"}]},
        {"name": "cardinal"}]}

Every node has a `name`; `synonyms` and `children` are optional lists. Names are
compared after `rewards.normalize_label`, so case and punctuation do not matter. The
same name may sit at several nodes; a prediction then gets the best verdict any of
them allows. `Taxonomy.from_edges` builds the same structure from (child, parent)
pairs; `to_dict` writes the format above.

A prediction is graded against the ground-truth node:
    the node itself or one of its synonyms    -> specific
    a descendant                              -> more specific
    the parent                                -> less specific
    a further ancestor                        -> generic
    a refusal ("none", "i don't know", ...)   -> abstain
    anything else (sibling, cousin, unknown,
    several options at once)                  -> wrong
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from speciarl_jax.rewards import categories as cat
from speciarl_jax.rewards.parsing import has_several_options, is_refusal, normalize_label
from speciarl_jax.verifier.base import ClassifyStats, NormalizedPair, Verifier, VerifierConfig


class UnknownLabelError(KeyError):
    """A ground-truth label the taxonomy does not contain."""


@dataclasses.dataclass
class _Node:
    name: str
    synonyms: tuple[str, ...]
    parent: int | None
    children: list[int]


class Taxonomy:
    """A forest of labels with synonyms; see the module docstring for the file format."""

    def __init__(self):
        self._nodes: list[_Node] = []
        self._by_label: dict[str, list[int]] = {}

    # --- building ------------------------------------------------------------------------------
    def add(self, name: str, parent: int | None = None, synonyms: Iterable[str] = ()) -> int:
        """Adds a node under `parent` (a node id, None for a root) and returns its id."""
        if not normalize_label(name):
            raise ValueError(f"taxonomy node name {name!r} is empty after normalisation")
        node_id = len(self._nodes)
        self._nodes.append(_Node(name, tuple(synonyms), parent, []))
        if parent is not None:
            self._nodes[parent].children.append(node_id)
        for label in (name, *synonyms):
            key = normalize_label(label)
            if key:
                ids = self._by_label.setdefault(key, [])
                if node_id not in ids:
                    ids.append(node_id)
        return node_id

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> "Taxonomy":
        taxonomy = cls()
        roots = [data] if isinstance(data, Mapping) else list(data)
        stack: list[tuple[Mapping[str, Any], int | None]] = [(root, None) for root in reversed(roots)]
        while stack:  # iterative, so deep hierarchies cannot hit the recursion limit
            node, parent = stack.pop()
            if not isinstance(node, Mapping) or "name" not in node:
                raise ValueError(f"taxonomy node must be an object with a 'name', got {node!r:.80}")
            unknown = set(node) - {"name", "synonyms", "children"}
            if unknown:
                raise ValueError(f"taxonomy node {node['name']!r} has unknown fields {sorted(unknown)}")
            node_id = taxonomy.add(node["name"], parent, node.get("synonyms", ()))
            stack.extend((child, node_id) for child in reversed(node.get("children", ())))
        return taxonomy

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Taxonomy":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"taxonomy file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"taxonomy file {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_edges(
        cls, edges: Iterable[tuple[str, str | None]], synonyms: Mapping[str, Iterable[str]] | None = None
    ) -> "Taxonomy":
        """Builds a taxonomy from (child, parent) name pairs; parent None marks a root.

        Names identify nodes here, so each name must have one parent. Parents that
        never appear as a child become roots. `synonyms` maps a node name to its synonyms.
        """
        parent_of: dict[str, str | None] = {}
        order: list[str] = []
        for child, parent in edges:
            if child in parent_of and parent_of[child] != parent:
                raise ValueError(f"{child!r} has two parents: {parent_of[child]!r} and {parent!r}")
            if child not in parent_of:
                order.append(child)
            parent_of[child] = parent
        for parent in list(parent_of.values()):
            if parent is not None and parent not in parent_of:
                parent_of[parent] = None
                order.append(parent)

        synonyms = synonyms or {}
        taxonomy = cls()
        ids: dict[str, int] = {}

        def place(name: str, trail: tuple[str, ...] = ()) -> int:
            if name in ids:
                return ids[name]
            if name in trail:
                raise ValueError(f"cycle in taxonomy edges through {name!r}")
            parent = parent_of[name]
            parent_id = None if parent is None else place(parent, trail + (name,))
            ids[name] = taxonomy.add(name, parent_id, synonyms.get(name, ()))
            return ids[name]

        for name in order:
            place(name)
        return taxonomy

    def to_dict(self) -> list[dict[str, Any]]:
        """The forest in the JSON file format (a list of root objects)."""

        def encode(node_id: int) -> dict[str, Any]:
            node = self._nodes[node_id]
            out: dict[str, Any] = {"name": node.name}
            if node.synonyms:
                out["synonyms"] = list(node.synonyms)
            if node.children:
                out["children"] = [encode(c) for c in node.children]
            return out

        return [encode(i) for i, node in enumerate(self._nodes) if node.parent is None]

    # --- querying -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, label: str) -> bool:
        return normalize_label(label) in self._by_label

    def names(self) -> list[str]:
        return [node.name for node in self._nodes]

    def lineage(self, label: str) -> list[str]:
        """The node names from `label` up to its root: [label's node, parent, ..., root].

        Raises UnknownLabelError when the label is not in the taxonomy (for a label that several nodes share,
        the first node added is used).
        """
        ids = self._by_label.get(normalize_label(label))
        if not ids:
            raise UnknownLabelError(f"label {label!r} is not in the taxonomy")
        return [self._nodes[i].name for i in [ids[0], *self._ancestors(ids[0])]]

    def _ancestors(self, node_id: int) -> list[int]:
        """Parent first, root last."""
        out = []
        parent = self._nodes[node_id].parent
        while parent is not None:
            out.append(parent)
            parent = self._nodes[parent].parent
        return out

    def _relation(self, truth: int, prediction: int) -> str:
        if truth == prediction:
            return cat.SPECIFIC
        if truth in self._ancestors(prediction):
            return cat.MORE_SPECIFIC
        ancestors = self._ancestors(truth)
        if ancestors and ancestors[0] == prediction:
            return cat.LESS_SPECIFIC
        if prediction in ancestors:
            return cat.GENERIC
        return cat.WRONG

    def grade(self, ground_truth: str, prediction: str, unknown_ground_truth: str = "error") -> str:
        """The verdict for one pair of raw or normalised strings.

        `unknown_ground_truth`: 'error' raises UnknownLabelError for a ground truth the
        taxonomy lacks; 'wrong' grades such pairs `specific` on an exact match, else `wrong`.
        """
        truth = normalize_label(ground_truth)
        guess = normalize_label(prediction)
        if not guess or has_several_options(prediction):
            return cat.WRONG
        if is_refusal(guess):
            return cat.ABSTAIN
        truth_ids = self._by_label.get(truth)
        if truth_ids is None:
            if unknown_ground_truth == "error":
                raise UnknownLabelError(f"ground truth {ground_truth!r} is not in the taxonomy")
            return cat.SPECIFIC if guess == truth else cat.WRONG
        if guess == truth:
            return cat.SPECIFIC
        guess_ids = self._by_label.get(guess, ())
        verdicts = [self._relation(t, g) for t in truth_ids for g in guess_ids]
        return min(verdicts, key=cat.RANK.__getitem__, default=cat.WRONG)


class RuleVerifier(Verifier):
    """Decides every pair from a Taxonomy; never calls an LLM."""

    def __init__(self, config: VerifierConfig, taxonomy: Taxonomy):
        super().__init__(config)
        self.taxonomy = taxonomy

    def _decide(self, pairs: Sequence[NormalizedPair], stats: ClassifyStats) -> dict[NormalizedPair, str]:
        return {pair: self.taxonomy.grade(*pair) for pair in pairs}
