"""Peak memory of attention (forward + backward) as the sequence grows; prints JSON.

    python benchmarks/attention_memory.py                  # N = 4096 and 16384, 8 heads of 64
    python benchmarks/attention_memory.py --tokens 2048 --factor 8

Compiles (does not run) value-and-grad of each backend at N and factor x N tokens and reads
XLA's memory analysis (temporaries + arguments + outputs). Chunked attention should grow about
linearly (ratio ~ factor); dense attention grows with N^2 (ratio ~ factor^2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vidit.models import attention as attention_lib  # noqa: E402
from vidit import host_malloc  # noqa: E402

host_malloc.tune()  # as the vidit commands do, before JAX starts its threads


def peak_bytes(backend: str, tokens: int, heads: int, head_dim: int, batch: int) -> int:
    shape = jax.ShapeDtypeStruct((batch, tokens, heads, head_dim), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(attention_lib.attention(q, k, v, backend=backend))

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(shape, shape, shape).compile()
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--backends", default="chunked,dense,xla")
    args = p.parse_args()
    result = {"shape": {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim},
              "tokens": [args.tokens, args.tokens * args.factor], "backends": {}}
    for backend in args.backends.split(","):
        small, large = (peak_bytes(backend, n, args.heads, args.head_dim, args.batch)
                        for n in result["tokens"])
        result["backends"][backend] = {"peak_mib": [small / 2**20, large / 2**20],
                                       "ratio": large / small}
    result["chunked_within_5x"] = result["backends"].get("chunked", {}).get("ratio", 99) <= 5
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
