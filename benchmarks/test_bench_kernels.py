"""pytest-benchmark timings of the Pallas HIGGS matmul (skipped without an NVIDIA GPU).

Host-clocked pytest-benchmark rounds include dispatch; the device-time table comes from
`benchmarks/kernel_bench.py` (fori_loop method). Run: pytest benchmarks/test_bench_kernels.py
-m gpu --benchmark-enable
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks.kernel_bench import random_weight
from pallas_kernels.higgs_matmul import higgs_matmul_pallas


def _on_gpu() -> bool:
    try:
        return jax.devices()[0].platform == "gpu"
    except RuntimeError:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _on_gpu(), reason="needs an NVIDIA GPU")]


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("p,n", [(1, 4), (1, 8), (1, 16), (2, 16), (2, 64), (2, 256)])
@pytest.mark.parametrize("k,n_cols", [(4096, 14336), (14336, 4096)])
def test_bench_higgs_matmul(benchmark, k, n_cols, p, n, m):
    w = random_weight(jax.random.key(0), k, n_cols, p, n)
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
    f = jax.jit(lambda a, b: higgs_matmul_pallas(a, b))
    f(x, w).block_until_ready()
    benchmark(lambda: f(x, w).block_until_ready())


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k,n_cols", [(4096, 14336), (14336, 4096)])
def test_bench_jnp_dot_bf16(benchmark, k, n_cols, m):
    w = jax.random.normal(jax.random.key(0), (k, n_cols), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
    f = jax.jit(jnp.dot)
    f(x, w).block_until_ready()
    benchmark(lambda: f(x, w).block_until_ready())
