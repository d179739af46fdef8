"""Builtin datasets shipped with raypeft (``data.train: builtin:<name>``).

Each builtin is a folder holding ``train.jsonl`` and ``eval.jsonl``. This module
imports only the standard library so that spec validation stays cheap.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN: dict[str, str] = {
    "json_extract": str(Path(__file__).parent / "json_extract"),
}

SPLITS = ("train", "eval")


def builtin_path(name: str, split: str) -> Path:
    """Path of ``<split>.jsonl`` for the builtin dataset ``name`` (split: ``train`` or ``eval``)."""
    if name not in BUILTIN:
        raise KeyError(f"unknown builtin dataset {name!r}; known: {sorted(BUILTIN)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for builtin dataset {name!r}; use one of {list(SPLITS)}")
    return Path(BUILTIN[name]) / f"{split}.jsonl"
