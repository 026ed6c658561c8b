"""The limits of this machine that profile_model.py's figures run into: matmul FLOP/s per dtype and
operand layout, and the memory bandwidth that bounds KV-cached generation.

    python benchmarks/cpu_limits.py [--sizes 1024,2048] [--no-bf16]

- float32 / bfloat16 square matmuls in nn.Linear's layout (x @ W.T, the forward) and the plain one
  (x @ W, part of the backward). A CPU without native bf16 (no AVX512-BF16 or AMX) runs bf16 far
  slower than float32, and x @ W far slower than x @ W.T; bf16 autocast then cannot beat float32.
- Read bandwidth (a sum over 200 MB) and matrix-vector products over weights that do not fit in the
  cache: one generated token reads every weight once, so this bounds cached tokens/s.
"""

from __future__ import annotations

import argparse
import time

import torch


def best_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_tflops(n: int, dtype: torch.dtype, transposed: bool) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    w = b.t() if transposed else b
    return 2 * n**3 / best_seconds(lambda: a @ w, repeats=2) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,2048", help="square matmul sizes (default 1024,2048)")
    parser.add_argument("--no-bf16", action="store_true", help="skip bfloat16 (minutes on a CPU without it)")
    args = parser.parse_args()
    print(f"torch {torch.__version__} | {torch.get_num_threads()} threads | cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()} | oneDNN bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    dtypes = [torch.float32] + ([] if args.no_bf16 else [torch.bfloat16])
    for dtype in dtypes:
        for n in (int(s) for s in args.sizes.split(",")):
            for transposed in (True, False):
                # x @ W in bf16 can run at ~1 GFLOP/s, where 512 already says it
                m = min(n, 512) if dtype == torch.bfloat16 and not transposed else n
                layout = "x @ W.T" if transposed else "x @ W  "
                print(f"{str(dtype)[6:]:<9} {m:>5}^2 {layout} {matmul_tflops(m, dtype, transposed):8.4f} TFLOP/s",
                      flush=True)
    big = torch.randn(50_000_000)
    print(f"read bandwidth (sum of 200 MB): {big.numel() * 4 / best_seconds(big.sum) / 1e9:.1f} GB/s")
    weights = [torch.randn(1536, 384) for _ in range(30)]  # 70 MB: more than any L3 here
    x = torch.randn(384)
    sec = best_seconds(lambda: [w @ x for w in weights]) / len(weights)
    print(f"matrix-vector over cold weights: {1536 * 384 * 4 / sec / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
