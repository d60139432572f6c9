"""How many Hessian-vector products ARPACK's lambda_max takes, by `ncv`, on model spectra (seconds to run).

    python benchmarks/lanczos_ncv.py

The reason behind measure_sharpness's ncv = 7 for lambda_max alone (sam_hf.sharpness.hessian.default_ncv).
Each spectrum is the diagonal of a 40,000 x 40,000 matrix shaped like a network's Hessian: an outlier lambda_1,
a bulk lambda_2 * k^-alpha over half the coordinates, zeros (unused parameters) and a little negative curvature.
eigsh(k=1, which="LA", tol=1e-3) from 5 random start vectors: the mean number of products, and the largest
relative error of lambda_max (ARPACK's criterion bounds it by tol; it is usually far smaller).
"""

import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh

NCVS = (4, 5, 6, 7, 8, 10, 12, 20)


def spectrum(n: int, top: float, second: float, alpha: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bulk = second * np.arange(1, n // 2 + 1) ** (-alpha)
    d = np.concatenate([[top], bulk, np.zeros(n - len(bulk) - 1)])
    d[-n // 10:] = -0.1 * second * rng.random(n // 10)
    return d


CASES = {"lambda_2/lambda_1 = 0.52, alpha 0.7": spectrum(40000, 5.35, 2.8, 0.7),
         "lambda_2/lambda_1 = 0.52, alpha 0.3": spectrum(40000, 5.35, 2.8, 0.3),
         "lambda_2/lambda_1 = 0.84, alpha 0.5": spectrum(40000, 5.35, 4.5, 0.5),
         "lambda_2/lambda_1 = 0.93, alpha 0.5": spectrum(40000, 5.35, 5.0, 0.5),
         "lambda_2/lambda_1 = 0.22, alpha 1.0": spectrum(40000, 9.3, 2.0, 1.0)}


def products(d: np.ndarray, ncv: int, seed: int) -> tuple[int, float]:
    count = [0]

    def matvec(v):
        count[0] += 1
        return d * v.ravel()

    op = LinearOperator((len(d), len(d)), matvec=matvec, dtype=np.float64)
    value = eigsh(op, k=1, which="LA", v0=np.random.default_rng(seed).standard_normal(len(d)), tol=1e-3, ncv=ncv,
                  return_eigenvectors=False)[0]
    return count[0], abs(value - d.max()) / d.max()


def main() -> None:
    print("| spectrum | " + " | ".join(f"ncv={n}" for n in NCVS) + " |")
    print("|---|" + "---:|" * len(NCVS))
    for name, d in CASES.items():
        cells = []
        for ncv in NCVS:
            runs = [products(d, ncv, seed) for seed in range(5)]
            cells.append(f"{np.mean([r[0] for r in runs]):.1f} ({max(r[1] for r in runs):.0e})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
