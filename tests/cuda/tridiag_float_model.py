#!/usr/bin/env python3
"""A numpy model of shard/kernels/symeig.cu's Householder tridiagonalisation run in float32 (as
the bf16 backend runs it), step for step as the kernel forms each reflector, against LAPACK's
double eigenvalues of the same matrices: the covariances of row-normalised query-like rows
(uneven column scales, trace 1), and near-tridiagonal matrices whose columns end in tiny tails.
`--cancel` forms a column's tail norm as nx2 - x0^2 (the double kernel's form) instead of summing
the tail apart, which takes columns with tails under sqrt(eps) |x0| for tridiagonal.
A study of the arithmetic (no GPU needed), not a check of the kernel: test_cuda_ops's qspec
checks compare the kernel itself with LAPACK (bound 2e-4 in bf16 mode).
Usage: /usr/bin/python3 tests/cuda/tridiag_float_model.py [--cancel]"""
import sys

import numpy as np


def tridiag_eigs(a, dt, apart):
    """Eigenvalues (descending) of the tridiagonal the kernel's reduction in dt leaves, and how
    many columns it took for tridiagonal already."""
    a = a.astype(dt).copy()
    d = a.shape[0]
    dg, e = np.zeros(d, dt), np.zeros(d, dt)
    skips = 0
    for k in range(d - 2):
        o = k + 1
        x = a[k, o:].copy()
        x0 = x[0]
        if apart:
            tail2 = dt(np.sum(x[1:] * x[1:]))
            nx2 = tail2 + x0 * x0
        else:
            nx2 = dt(np.sum(x * x))
            tail2 = nx2 - x0 * x0
        alpha = -np.sqrt(nx2) if x0 >= 0 else np.sqrt(nx2)
        dg[k] = a[k, k]
        if not tail2 > 0:
            e[k] = x0
            skips += 1
            continue
        e[k] = alpha
        v = np.zeros(d, dt)
        v[o:] = x
        v[o] -= alpha
        beta = dt(2) / (tail2 + (x0 - alpha) * (x0 - alpha))
        p = beta * (a @ v)
        p[:o] = 0
        kk = dt(0.5) * beta * dt(p @ v)
        w = p - kk * v
        a -= np.outer(v, w) + np.outer(w, v)
    dg[d - 2], e[d - 2], dg[d - 1] = a[d - 2, d - 2], a[d - 1, d - 2], a[d - 1, d - 1]
    off = e[: d - 1].astype(np.float64)
    t = np.diag(dg.astype(np.float64)) + np.diag(off, 1) + np.diag(off, -1)
    return np.sort(np.linalg.eigvalsh(t))[::-1], skips


def main():
    apart = "--cancel" not in sys.argv[1:]
    rng = np.random.default_rng(1)
    d = 128
    cases = []
    for i in range(3):
        q = rng.standard_normal((4096, d)) * np.exp(rng.standard_normal(d))
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        c = q.T @ q / 4096
        cases.append((f"covariance {i}", c / np.trace(c)))
    for tiny in (1e-5, 1e-6, 1e-7):
        c = np.diag(rng.uniform(0.005, 0.01, d))
        n = rng.uniform(-1, 1, (d, d)) * tiny
        n = (n + n.T) / 2
        np.fill_diagonal(n, 0)
        for i in range(d - 1):
            c[i, i + 1] = c[i + 1, i] = 0.002
            n[i, i + 1] = n[i + 1, i] = 0
        c = c + n
        cases.append((f"tridiagonal + {tiny:g}", c / np.trace(c)))
    worst = 0.0
    for name, c in cases:
        ref = np.sort(np.linalg.eigvalsh(c))[::-1]
        got, skips = tridiag_eigs(c, np.float32, apart)
        err = np.abs(got - ref).max()
        worst = max(worst, err)
        print(f"{name:24s} largest error {err:.2e} (the largest 32: "
              f"{np.abs(got[:32] - ref[:32]).max():.2e}), columns taken as tridiagonal {skips}")
    print(f"worst {worst:.2e} ({'tails summed apart' if apart else 'nx2 - x0^2'})")


if __name__ == "__main__":
    main()
