#!/usr/bin/python3
"""MiniCache calibration reference: the mean angular distance between adjacent layers' keys and
values on calibration windows, from a float32 numpy Llama of the fixture (safetensors read
directly, no PyTorch: np_llama.py), and the merge set it gives (tests/golden/test_minicache_calib.c
compares the engine's with it).

For each window (prefilled whole, every token kept), each layer pair (l, l + 1), each KV head and
each token: the angular distance arccos(cos) / pi of the token's rotated keys in the two layers
and of its values, the larger of the two (MiniCache's distance as the merge uses it). d_l is the
mean over windows, KV heads and tokens. The merge set is the P disjoint adjacent pairs (a, a + 1)
of least total distance, found here by trying every set (independent of the engine's dynamic
programming); of sets with equal sums, the one whose deepest pair is deepest, then the next.

Usage: minicache_calib_ref.py MODEL_DIR QUERY_JSON, the query {"windows": [[ids], ...],
"n_pairs": P}. Prints {"distances": [L - 1], "pairs": [first layers, ascending], "margin": the
second best set's sum less the best's (null with one set)} as JSON on stdout."""
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402  (the C test checks numpy first and skips without it)
from minicache_ref import distance, prefill  # noqa: E402
from np_llama import Model  # noqa: E402


def mean_distances(m, windows):
    """(L - 1) mean distances over the windows' tokens and the KV heads."""
    sums = np.zeros(m.L - 1)
    count = 0
    for ids in windows:
        ks, vs = prefill(m, ids)
        for l in range(m.L - 1):
            for j in range(m.Hkv):
                d = np.maximum(distance(ks[l][:, j], ks[l + 1][:, j]),
                               distance(vs[l][:, j], vs[l + 1][:, j]))
                sums[l] += float(d.sum())
        count += len(ids) * m.Hkv
    return sums / count


def select(d, n_layers, n_pairs):
    """Every set of n_pairs disjoint adjacent pairs: the least sum, ties to the deepest pairs;
    also the gap to the next best sum."""
    sets = []
    for firsts in itertools.combinations(range(n_layers - 1), n_pairs):
        if all(b - a >= 2 for a, b in zip(firsts, firsts[1:])):
            sets.append((sum(d[a] for a in firsts), tuple(sorted(firsts, reverse=True))))
    best = min(s for s, _ in sets)
    winners = [f for s, f in sets if s == best]
    pick = sorted(max(winners))
    others = sorted({s for s, _ in sets if s > best})
    return pick, (others[0] - best if others else None)


def main():
    model_dir, query = sys.argv[1], sys.argv[2]
    with open(query) as f:
        q = json.load(f)
    m = Model(model_dir)
    d = mean_distances(m, q["windows"])
    pairs, margin = select(list(d), m.L, q["n_pairs"])
    json.dump({"distances": [float(x) for x in d], "pairs": pairs, "margin": margin}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
