"""Validation sharding: equal forwards per rank, every sample counted once."""

from __future__ import annotations

from mmtrain.engine.evaluate import rank_share


def test_validation_shares_cover_each_sample_once():
    shares = [rank_share(7, r, 3) for r in range(3)]
    assert {len(s) for s in shares} == {3}  # equal forwards on every rank
    counted = sorted(i for s in shares for i, counts in s if counts)
    assert counted == list(range(7))
    assert sum(not counts for s in shares for _, counts in s) == 2
