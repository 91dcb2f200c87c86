"""Topology algorithms: time and peak memory, side by side with the bare work they must match.

- CH2-L3n beside the same four fp32 matmuls done bare (A·Aᵀ, F·A, Aᵀ·A, F·Aᵀ): goal ratio ≤ 1.3;
  and CH2-L3n as it runs, whose products take the mask as CSR at low density, beside the dense
  products (the density where the CSR products stop paying sets ``SPARSE_PRODUCTS``);
- CH3-L3p (path-based) beside CH2-L3n on the same mask;
- soft sampling (regrowth ∝ score, removal ∝ score^T) on a 4096x11008 layer;
- the common-neighbour counts A·Aᵀ and Aᵀ·A as int8 products summed in int32 (what the
  Cannistraci-Hebb predictors run on the CPU) beside the same products in float32.

The machine is noisy, so each ratio comes from one process that alternates the two contenders
``--repeat`` times and keeps each one's fastest run. Peak memory is measured in a fresh process
per case, with one call: the process's is the process's peak resident set during the
call (Linux VmHWM, reset just before them through /proc/self/clear_refs) minus its resident set
just before them: the memory the algorithm itself takes beyond its inputs. Run from the repository root:

    python benchmarks/topology.py                # the full table (several minutes)
    python benchmarks/topology.py --quick        # small shapes only
    python benchmarks/topology.py --counts       # the int8 / float32 counts only (a minute)
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import platform
import time

import torch

FULL_SHAPES = [(1024, 1024), (1568, 1568), (4096, 11008)]
QUICK_SHAPES = [(256, 256), (512, 512)]
DENSITIES = [0.01, 0.02, 0.05, 0.10, 0.30]
L3P_SHAPE, L3P_DENSITIES = (1024, 1024), [0.01, 0.05]
COUNT_SHAPES = [(1024, 1024), (1568, 784), (1568, 1568), (2048, 5632)]


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def _mask(shape, density, seed=0):
    from sparsify.topology.initial import erdos_renyi
    return erdos_renyi(*shape, density, torch.Generator().manual_seed(seed))


def _bare(mask):
    a = mask.float()
    f_out = a @ a.t()
    s = f_out @ a
    del f_out
    f_in = a.t() @ a
    s.addmm_(a, f_in.t())
    return s


def _dense_products(fn):
    """``fn`` with the Cannistraci-Hebb products forced dense, whatever the density."""
    from sparsify.topology import regrowth

    def run():
        saved, regrowth.SPARSE_PRODUCTS = regrowth.SPARSE_PRODUCTS, 0.0
        try:
            return fn()
        finally:
            regrowth.SPARSE_PRODUCTS = saved
    return run


def _contender(kind, shape, density):
    """A zero-argument callable doing ``kind`` on a fresh ER mask of ``shape`` at ``density``."""
    from sparsify.topology.regrowth import ch2_l3n, ch3_l3p, regrow
    from sparsify.topology.removal import magnitude, remove

    mask = _mask(shape, density)
    gen = torch.Generator().manual_seed(1)
    count = int(0.3 * mask.sum())
    if kind == "bare":
        return lambda: _bare(mask)
    if kind == "CH2_L3n":
        return lambda: ch2_l3n(mask)
    if kind == "CH2_L3n_dense":
        return _dense_products(lambda: ch2_l3n(mask))
    if kind == "CH3_L3p":
        return lambda: ch3_l3p(mask)
    if kind == "counts_float32":
        a = mask.float()
        return lambda: (a @ a.t(), a.t() @ a)
    if kind == "counts_int8":
        from sparsify.topology.regrowth import _integer_products
        return lambda: _integer_products(mask)
    if kind == "soft_regrowth":
        scores = ch2_l3n(mask)
        return lambda: regrow(mask, scores, count, gen, mode="soft")
    if kind == "soft_removal":
        scores = magnitude(torch.randn(shape, generator=torch.Generator().manual_seed(2)) * mask, mask)
        return lambda: remove(mask, scores, count, gen, mode="soft", delta=0.75)
    raise ValueError(kind)


def _times(kinds, shape, density, repeat, queue):
    fns = {k: _contender(k, shape, density) for k in kinds}
    best = {k: float("inf") for k in kinds}
    for _ in range(repeat):
        for k, fn in fns.items():  # alternate, so both see the same machine
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    queue.put(best)


def _memory(kind, shape, density, queue):
    fn = _contender(kind, shape, density)
    _reset_peak()
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    queue.put({"peak_mb": _status_mb("VmHWM") - before, "seconds": seconds})


def _in_fresh_process(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def times(kinds, shape, density, repeat):
    return _in_fresh_process(_times, kinds, shape, density, repeat)


def memory(kind, shape, density):
    return _in_fresh_process(_memory, kind, shape, density)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    parser.add_argument("--repeat", type=int, default=5, help="alternating runs per ratio (fastest kept)")
    parser.add_argument("--counts", action="store_true", help="only the int8 / float32 common-neighbour counts")
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    l3p_shape = QUICK_SHAPES[0] if args.quick else L3P_SHAPE
    print(f"# topology benchmark, {datetime.date.today()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print()
    if args.counts:
        counts(args.repeat)
        return
    print("## CH2-L3n vs the same four matmuls done bare (fp32); CSR products vs dense ones")
    print()
    print("| shape (out x in) | density | bare matmuls s | CH2-L3n dense products s | ratio | CH2-L3n as run s "
          "| as run / dense products | CH2-L3n peak extra MB |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        repeat = 2 if shape[0] * shape[1] > 10**7 else args.repeat
        for density in DENSITIES:
            t = times(["bare", "CH2_L3n_dense", "CH2_L3n"], shape, density, repeat)
            mem = memory("CH2_L3n", shape, density)
            print(f"| {shape[0]}x{shape[1]} | {density:.0%} | {t['bare']:.3f} | {t['CH2_L3n_dense']:.3f} | "
                  f"{t['CH2_L3n_dense'] / t['bare']:.2f} | {t['CH2_L3n']:.3f} | "
                  f"{t['CH2_L3n'] / t['CH2_L3n_dense']:.2f} | {mem['peak_mb']:.0f} |", flush=True)
    print()
    print("## CH3-L3p (path-based) vs CH2-L3n (node-based), same mask")
    print()
    print("| shape | density | CH2-L3n s | CH3-L3p s | L3p / L3n | CH3-L3p peak extra MB |")
    print("|---|---|---|---|---|---|")
    for density in L3P_DENSITIES:
        t = times(["CH2_L3n", "CH3_L3p"], l3p_shape, density, args.repeat)
        mem = memory("CH3_L3p", l3p_shape, density)
        print(f"| {l3p_shape[0]}x{l3p_shape[1]} | {density:.0%} | {t['CH2_L3n']:.3f} | {t['CH3_L3p']:.3f} | "
              f"{t['CH3_L3p'] / t['CH2_L3n']:.1f} | {mem['peak_mb']:.0f} |", flush=True)
    print()
    big = shapes[-1]
    print(f"## Soft sampling on {big[0]}x{big[1]} ({big[0] * big[1]:,} positions; 30% of the links move)")
    print()
    print("| operation | density | s | peak extra MB | score tensor MB |")
    print("|---|---|---|---|---|")
    for kind in ("soft_regrowth", "soft_removal"):
        for density in (0.01, 0.30):
            r = memory(kind, big, density)
            print(f"| {kind.replace('_', ' ')} | {density:.0%} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | "
                  f"{big[0] * big[1] * 4 / 2**20:.0f} |", flush=True)
    print()
    counts(args.repeat)


def counts(repeat: int) -> None:
    print("## Common-neighbour counts A·Aᵀ and Aᵀ·A: int8 products summed in int32 vs float32 (5% density)")
    print()
    print("| shape (out x in) | float32 s | int8 s | int8 / float32 |")
    print("|---|---|---|---|")
    for shape in COUNT_SHAPES:
        t = times(["counts_float32", "counts_int8"], shape, 0.05, repeat)
        print(f"| {shape[0]}x{shape[1]} | {t['counts_float32']:.3f} | {t['counts_int8']:.3f} | "
              f"{t['counts_int8'] / t['counts_float32']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
