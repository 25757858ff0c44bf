"""Cost of the search-centring figure that `encode` records (cxrembed.store.centring), as
the store grows, with and past the neighbour pool's cap.

    python benchmarks/bench_centring_cost.py --rows 100000 300000 [--pool 100000]

Rows are synthetic unit vectors made block by block on demand (a store of any size costs
no memory); 14 labels at 10%, 3 rows per patient. ``--pool`` lowers the cap
(``NEIGHBOUR_POOL``, 1,000,000 in cxrembed) so that the cap's effect shows at sizes this
machine measures in seconds. Printed per size: CPU and wall seconds, rows read, pool rows.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from cxrembed.store import centring

DIM = 512


def block_reader(n: int, log: list[int]):
    """read(start, stop): deterministic unit vectors of those rows, counting rows read."""
    def read(start: int, stop: int) -> np.ndarray:
        log.append(stop - start)
        out = np.empty((stop - start, DIM), np.float32)
        for b in range(start // 4096, (stop - 1) // 4096 + 1):
            x = np.random.default_rng(b).standard_normal((4096, DIM), dtype=np.float32)
            lo, hi = max(start, b * 4096), min(stop, (b + 1) * 4096)
            out[lo - start:hi - start] = x[lo - b * 4096:hi - b * 4096]
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out
    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--pool", type=int, default=centring.NEIGHBOUR_POOL)
    args = parser.parse_args()
    centring.NEIGHBOUR_POOL = args.pool
    print(f"neighbour pool cap {args.pool:,} rows; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for n in args.rows:
        rng = np.random.default_rng(0)
        labels = (rng.random((n, 14)) < 0.1).astype(np.uint8)
        patients = np.arange(n) // 3
        mean = np.zeros(DIM, np.float32)
        mean[0] = 0.1
        log: list[int] = []
        wall, cpu = time.perf_counter(), time.process_time()
        record = centring.measure_centring(block_reader(n, log), n, labels,
                                           np.ones_like(labels), patients, mean)
        print(f"{n:>11,} rows: {time.process_time() - cpu:6.1f} s CPU, "
              f"{time.perf_counter() - wall:6.1f} s wall; rows read {sum(log):,}; "
              f"pool {record['pool_rows']:,}; queries {record['queries']:,}", flush=True)


if __name__ == "__main__":
    main()
