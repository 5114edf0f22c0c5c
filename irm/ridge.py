"""Closed-form ridge regression (paper 4.3's R, refitted): one thin SVD, then a refit per target or penalty in two
small matrix products, with exact leave-one-group-out error. The control refits R with it for both models, its
permutation null and its raw activations (irm.chains)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from irm.errors import UserError


class RidgePath:
    """Ridge regressions of many targets on one design matrix, in closed form from one thin SVD of the centred
    rows, so a refit (a shuffled target, another penalty) costs two small matrix products instead of a training run.

    For a target y the fit minimises ||X w + b - y||^2 + alpha ||w||^2 with a free intercept b (as IRMRegression's
    weight decay penalises w only); alpha is one of `alphas`, multiples of the mean squared singular value (so the
    grid does not depend on the features' scale), chosen by exact leave-one-group-out error when not given: with
    `groups` (a label per row: a triple's two rows share one), each group's held-out residuals are (I - H_gg)^-1 r_g
    from the ridge hat matrix H (no refit), so a triple's second row never helps predict its first; without groups
    every row is its own group."""

    def __init__(self, x_NF, alphas=(1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0), groups=None):
        x = np.asarray(x_NF, dtype=np.float64)
        if x.ndim != 2 or len(x) < 3:
            raise UserError(f"a ridge fit needs at least 3 rows of features, got shape {x.shape}")
        if len(alphas) == 0 or min(alphas) <= 0:
            raise UserError(f"ridge alphas must be positive numbers, got {list(alphas)}")
        self.x_mean = x.mean(axis=0)
        u, s, vt = np.linalg.svd(x - self.x_mean, full_matrices=False)
        keep = s > s[0] * 1e-10 if len(s) else s > 0
        self.u, self.s, self.vt = u[:, keep], s[keep], vt[keep]
        self.scale = float(np.mean(self.s ** 2)) if self.s.size else 1.0
        self.alphas = np.asarray(alphas, dtype=np.float64) * self.scale
        self.multiples = [float(a) for a in alphas]
        self._loo_blocks = self._group_blocks(np.arange(len(x)) if groups is None else np.asarray(groups))

    def _group_blocks(self, groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per group size: the groups' row indices [G, size] and (I - H_gg)^-1 for every alpha [A, G, size, size]."""
        _, inverse = np.unique(groups, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        sizes = np.bincount(inverse)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        n = len(groups)
        s2 = self.s ** 2
        shrink_AK = s2 / (s2 + self.alphas[:, None])
        blocks = []
        for size in np.unique(sizes):
            idx = np.stack([order[starts[g]: starts[g] + size] for g in np.flatnonzero(sizes == size)])  # [G, size]
            u_GSK = self.u[idx]
            h = np.einsum("gik,ak,gjk->agij", u_GSK, shrink_AK, u_GSK) + 1.0 / n
            eye = np.eye(size)
            blocks.append((idx, np.linalg.pinv(eye - h)))
        return blocks

    def loo_error(self, y_N) -> np.ndarray:
        """Mean squared leave-one-group-out residual of `y_N` at every alpha of the grid."""
        y = np.asarray(y_N, dtype=np.float64)
        yc = y - y.mean()
        uty = self.u.T @ yc
        s2 = self.s ** 2
        shrink_AK = s2 / (s2 + self.alphas[:, None])
        resid_AN = yc[None, :] - (shrink_AK * uty) @ self.u.T
        total = np.zeros(len(self.alphas))
        for idx, inv in self._loo_blocks:
            r = resid_AN[:, idx]  # [A, G, size]
            total += (np.einsum("agij,agj->agi", inv, r) ** 2).sum(axis=(1, 2))
        return total / len(y)

    def best_multiple(self, y_N) -> float:
        return self.multiples[int(np.argmin(self.loo_error(y_N)))]

    def fit(self, y_N, multiple: Optional[float] = None) -> tuple[np.ndarray, float, float]:
        """(w, b, alpha multiple) for target `y_N`, at `multiple` when given, else at the grid's best by
        leave-one-group-out error."""
        y = np.asarray(y_N, dtype=np.float64)
        if multiple is None:
            multiple = self.best_multiple(y)
        y_mean = float(y.mean())
        uty = self.u.T @ (y - y_mean)
        w = self.vt.T @ (self.s / (self.s ** 2 + multiple * self.scale) * uty)
        return w, y_mean - float(self.x_mean @ w), float(multiple)


def shared_multiple(paths: Sequence[RidgePath], ys: Sequence[np.ndarray]) -> float:
    """One penalty for several chains (e.g. the tuned and base models' R): the grid multiple with the least summed
    leave-one-group-out error, each chain's error over its target's variance so that no chain's scale dominates."""
    multiples = paths[0].multiples
    if any(p.multiples != multiples for p in paths):
        raise ValueError("the chains' ridge paths must share one grid of penalties")
    total = sum(p.loo_error(y) / max(float(np.var(y)), 1e-300) for p, y in zip(paths, ys))
    return multiples[int(np.argmin(total))]


class RidgeRefits:
    """Ridge refits (free intercept, penalty `alpha` in absolute units) on bootstrap draws of the rows of x (indices,
    repeats allowed), each returning its predictions on `predict_MF`. A draw is solved as a weighted ridge over the
    distinct rows drawn (weight: how often drawn), which is the same fit: in the primal form (features) when there
    are fewer features than rows, else in the dual (rows), where the Gram matrix of all rows and the predicted
    points' products with them are computed once and a draw costs one solve over its distinct rows."""

    def __init__(self, x_NF, y_N, alpha: float, predict_MF):
        self.x = np.asarray(x_NF, dtype=np.float64)
        self.y = np.asarray(y_N, dtype=np.float64)
        self.alpha = float(alpha)
        self.predict_MF = np.asarray(predict_MF, dtype=np.float64)
        n, f = self.x.shape
        self.dual = f > n
        if self.dual:
            self.gram = self.x @ self.x.T
            self.cross = self.predict_MF @ self.x.T

    def predict(self, rows) -> np.ndarray:
        from scipy.linalg import cho_solve

        counts = np.bincount(np.asarray(rows), minlength=len(self.y)).astype(np.float64)
        u = np.flatnonzero(counts)
        m = counts[u]
        total = m.sum()
        y = self.y[u]
        y_mean = float(m @ y / total)
        yc = y - y_mean
        if not self.dual:
            x = self.x[u]
            x_mean = m @ x / total
            xc = x - x_mean
            # einsum, not BLAS: a multithreaded gemm of this small size spins its threads against the other
            # processes on the machine (measured 2.9 ms against einsum's 0.1 ms with two busy cores)
            gram = np.einsum("ni,n,nj->ij", xc, m, xc)
            w = np.linalg.solve(gram + self.alpha * np.eye(x.shape[1]), xc.T @ (m * yc))
            return self.predict_MF @ w + float(y_mean - x_mean @ w)
        # the Gram of the drawn rows centred at their weighted mean, scaled by sqrt(weight) on both sides, plus the
        # penalty: built in place on the one copy the indexing makes
        k = self.gram[np.ix_(u, u)]
        km = k @ m / total
        mkm = float(m @ km / total)
        d = np.sqrt(m)
        k -= km[:, None]
        k -= km[None, :]
        k += mkm
        k *= d[:, None]
        k *= d[None, :]
        k.flat[:: len(u) + 1] += self.alpha
        # numpy's Cholesky, not scipy's cho_factor: it releases the GIL, so the bootstrap's draws run on two
        # threads at twice the rate (scipy's: 1.4x, measured on 2 cores at 755 rows)
        a = cho_solve((np.linalg.cholesky(k), True), d * yc, check_finite=False)
        da = d * a  # w = Xc^T da
        sum_da = float(da.sum())
        x_mean_w = float(km @ da - mkm * sum_da)
        spread = np.zeros((len(self.y), 2))  # da and the weights on all rows: one pass over `cross` for both
        spread[u, 0] = da
        spread[u, 1] = m / total
        both = self.cross @ spread
        return both[:, 0] - both[:, 1] * sum_da + y_mean - x_mean_w
