"""Does XLA put a decode-like loop into command buffers (CUDA graphs) under the current XLA_FLAGS?

Compiles a small `lax.fori_loop` (a dot and a few elementwise ops per step) and prints how often the
optimized HLO mentions command buffers, and its while/conditional lines. Run it once with the
default flags and once with e.g.
XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
to see what a flag changes before timing with it. Runs anywhere; only a GPU build uses the flags.
Usage: PYTHONPATH=. python benchmarks/cmdbuf_probe.py
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp


def loop(x: jax.Array, w: jax.Array, n: int) -> jax.Array:
    def body(_, c):
        y = jnp.tanh(c @ w) * 2 + 1
        y = jax.nn.silu(y) * c
        return (y / jnp.sqrt(jnp.mean(y * y) + 1e-6)).astype(c.dtype)

    return jax.lax.fori_loop(0, n, body, x)


def main() -> None:
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
    x = jnp.ones((1, 256), jnp.bfloat16)
    w = jnp.ones((256, 256), jnp.bfloat16)
    txt = jax.jit(loop).lower(x, w, 4).compile().as_text()
    print(f"command buffer mentions in the optimized HLO: {len(re.findall('command_buffer', txt))}")
    for line in txt.splitlines():
        if "command_buffer" in line or " while(" in line or " conditional(" in line:
            print("  " + line.strip()[:220])


if __name__ == "__main__":
    main()
