"""cipa_bundle.components against hand-built masks and an independent breadth-first labelling."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from cipa_bundle.components import label_components, neighbour_steps
from cipa_bundle.errors import CipaInputError


def _bfs_components(mask: np.ndarray, connectivity: int) -> list[frozenset]:
    """Components as sets of voxel tuples, by plain breadth-first search over the same neighbourhood definition."""
    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    steps = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if 0 < abs(a) + abs(b) + abs(c) <= rank]
    seen, out = set(), []
    for start in zip(*np.nonzero(mask)):
        if start in seen:
            continue
        seen.add(start)
        queue, comp = deque([start]), {start}
        while queue:
            v = queue.popleft()
            for s in steps:
                w = (v[0] + s[0], v[1] + s[1], v[2] + s[2])
                if all(0 <= w[i] < mask.shape[i] for i in range(3)) and mask[w] and w not in seen:
                    seen.add(w)
                    comp.add(w)
                    queue.append(w)
        out.append(frozenset(comp))
    return out


def test_neighbourhood_sizes():
    assert [len(neighbour_steps(c)) for c in (6, 18, 26)] == [6, 18, 26]
    with pytest.raises(ValueError, match="6, 18 or 26"):
        neighbour_steps(8)


def test_face_edge_and_corner_contacts():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # corner contact only
    mask[3, 0, 0] = mask[3, 1, 1] = True  # edge contact only
    mask[0, 3, 3] = mask[0, 3, 2] = True  # face contact
    assert label_components(mask, 6)[1] == 5
    assert label_components(mask, 18)[1] == 4
    assert label_components(mask, 26)[1] == 3


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_matches_breadth_first_search_on_random_masks(connectivity):
    rng = np.random.default_rng(connectivity)
    for _ in range(5):
        mask = rng.random((7, 6, 5)) < 0.3
        labels, n = label_components(mask, connectivity)
        expected = _bfs_components(mask, connectivity)
        got = [frozenset(zip(*np.nonzero(labels == k))) for k in range(1, n + 1)]
        assert sorted(map(sorted, got)) == sorted(map(sorted, expected))
        sizes = [len(c) for c in got]
        assert sizes == sorted(sizes, reverse=True)  # numbered largest first
        assert ((labels > 0) == mask).all()


def test_empty_and_invalid_masks():
    labels, n = label_components(np.zeros((3, 3, 3)))
    assert n == 0 and labels.shape == (3, 3, 3) and not labels.any()
    with pytest.raises(CipaInputError, match="3-D"):
        label_components(np.zeros((3, 3)))
