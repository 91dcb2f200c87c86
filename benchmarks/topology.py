"""Topology algorithms: time and peak memory, side by side with the bare work they must match.

- CH2-L3n beside the same four fp32 matmuls done bare (A·Aᵀ, F·A, Aᵀ·A, F·Aᵀ): goal ratio ≤ 1.3;
- CH3-L3p (path-based) beside CH2-L3n on the same mask;
- soft sampling (regrowth ∝ score, removal ∝ score^T) on a 4096x11008 layer.

Every case runs in a fresh process. Peak memory is the process's peak resident set during the
calls (Linux VmHWM, reset just before them through /proc/self/clear_refs) minus its resident set
just before them: the memory the algorithm itself takes beyond its inputs. Times are the median of
``--repeat`` runs. Run from the repository root:

    python benchmarks/topology.py                # the full table (several minutes)
    python benchmarks/topology.py --quick        # small shapes only
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import platform
import statistics
import time

import torch

FULL_SHAPES = [(1024, 1024), (1568, 1568), (4096, 11008)]
QUICK_SHAPES = [(256, 256), (512, 512)]
DENSITIES = [0.01, 0.05, 0.30]
L3P_SHAPE, L3P_DENSITIES = (1024, 1024), [0.01, 0.05]


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
    from sparsify.topology.init import erdos_renyi
    return erdos_renyi(*shape, density, torch.Generator().manual_seed(seed))


def _bare(mask):
    a = mask.float()
    f_out = a @ a.t()
    s = f_out @ a
    del f_out
    f_in = a.t() @ a
    s += (f_in @ a.t()).t()
    return s


def _case(kind, shape, density, repeat, queue):
    from sparsify.topology.regrowth import ch2_l3n, ch3_l3p, regrow
    from sparsify.topology.removal import magnitude, remove, temperature

    mask = _mask(shape, density)
    gen = torch.Generator().manual_seed(1)
    if kind == "bare":
        def fn(): return _bare(mask)
    elif kind == "CH2_L3n":
        def fn(): return ch2_l3n(mask)
    elif kind == "CH3_L3p":
        def fn(): return ch3_l3p(mask)
    elif kind == "soft_regrowth":
        scores = ch2_l3n(mask)
        count = int(0.3 * mask.sum())
        def fn(): return regrow(mask, scores, count, gen, mode="soft")
    elif kind == "soft_removal":
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * mask
        scores = magnitude(weight, mask)
        count = int(0.3 * mask.sum())
        def fn(): return remove(mask, scores, count, gen, mode="soft", delta=0.75)
    else:
        raise ValueError(kind)
    _reset_peak()
    before = _status_mb("VmRSS")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        del out
    queue.put({"kind": kind, "shape": shape, "density": density, "seconds": statistics.median(times),
               "peak_mb": _status_mb("VmHWM") - before, "mask_mb": mask.numel() / 2**20})


def run(kind, shape, density, repeat):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(kind, shape, density, repeat, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median reported)")
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    l3p_shape = QUICK_SHAPES[0] if args.quick else L3P_SHAPE
    print(f"# topology benchmark, {datetime.date.today()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print()
    print("## CH2-L3n vs the same four matmuls done bare (fp32)")
    print()
    print("| shape (out x in) | density | bare matmuls s | CH2-L3n s | ratio | CH2-L3n peak extra MB |")
    print("|---|---|---|---|---|---|")
    ch2 = {}
    for shape in shapes:
        repeat = 1 if shape[0] * shape[1] > 10**7 else args.repeat
        for density in DENSITIES:
            bare = run("bare", shape, density, repeat)
            node = run("CH2_L3n", shape, density, repeat)
            ch2[(shape, density)] = node
            print(f"| {shape[0]}x{shape[1]} | {density:.0%} | {bare['seconds']:.3f} | {node['seconds']:.3f} | "
                  f"{node['seconds'] / bare['seconds']:.2f} | {node['peak_mb']:.0f} |", flush=True)
    print()
    print("## CH3-L3p (path-based) vs CH2-L3n (node-based), same mask")
    print()
    print("| shape | density | CH2-L3n s | CH3-L3p s | L3p / L3n | CH3-L3p peak extra MB |")
    print("|---|---|---|---|---|---|")
    for density in L3P_DENSITIES:
        node = ch2.get((l3p_shape, density)) or run("CH2_L3n", l3p_shape, density, args.repeat)
        path = run("CH3_L3p", l3p_shape, density, args.repeat)
        print(f"| {l3p_shape[0]}x{l3p_shape[1]} | {density:.0%} | {node['seconds']:.3f} | {path['seconds']:.3f} | "
              f"{path['seconds'] / node['seconds']:.1f} | {path['peak_mb']:.0f} |", flush=True)
    print()
    big = shapes[-1]
    print(f"## Soft sampling on {big[0]}x{big[1]} ({big[0] * big[1]:,} positions; 30% of the links move)")
    print()
    print("| operation | density | s | peak extra MB | score tensor MB |")
    print("|---|---|---|---|---|")
    for kind in ("soft_regrowth", "soft_removal"):
        for density in (0.01, 0.30):
            r = run(kind, big, density, 1)
            print(f"| {kind.replace('_', ' ')} | {density:.0%} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | "
                  f"{big[0] * big[1] * 4 / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
