"""Grafting has no run-config settings: surrogates are built by `mmtrain surrogate build` and grafting
is an evaluation option (`mmtrain eval --graft-llm`)."""

from __future__ import annotations

SECTIONS: dict = {}
