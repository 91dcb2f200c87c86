"""The export's report as lines a person reads (the CLI prints them)."""
from __future__ import annotations


def print_report(report: dict) -> None:
    """A summary of an export a person can read."""
    lines = [f"exported {report['onnx']} (opset {report['opset']}) and {report['files']['pt2']}"]
    if "parameters" in report:
        p = report["parameters"]
        lines.append(f"  parameters {p['before']:,} -> {p['after']:,} ({p['after'] / max(p['before'], 1):.1%}), "
                     f"{p['nonzero']:,} of them non-zero")
        for u in report["units"]:
            split = "".join(f"; {a} set to {w}" for a, w in u.get("rewritten", {}).items())
            lines.append(f"  {' + '.join(u['layers'])} -> {u['into']}: {u['kept']} of {u['neurons']} neurons kept "
                         f"({u['unused']} unused, {u['folded']} constant folded, {u['zero']} zero{split})")
        for h in report.get("heads", []):
            layers = ' + '.join(dict.fromkeys(h['layers']))  # a fused qkv layer once
            split = "".join(f"; {a} set to {w}" for a, w in h.get("rewritten", {}).items())
            split += "".join(f"; {a} cut to the kept heads" for a in h.get("narrowed", []))
            if h.get("traced") is not None:
                split += f"; {h['traced'] or 'the model'} runs as its graph with the head sizes rewritten"
            lines.append(f"  {layers} -> {h['into']}: {h['kept']} of {h['heads']} heads kept "
                         f"({h['kept_kv']} of {h['kv_heads']} kv heads; {h['folded']} dead groups' bias folded{split})")
        for dst, why in report.get("not_shrunk", {}).items():
            lines.append(f"  not shrunk: input of {dst}: {why}")
    if report["compact"]:
        lines.append(f"  stored as values + indices: {', '.join(report['compact'])}")
    if report.get("sparse_matmul"):
        lines.append(f"  multiplying only their non-zero weights: {', '.join(report['sparse_matmul'])}")
    check = report.get("onnxruntime_max_abs_diff")
    lines.append(f"  parity: PyTorch {report['torch_max_abs_diff']:.2g} (limit {report['torch_limit']:.2g})"
                 + (f", onnxruntime {check:.2g} (limit {report['onnxruntime_limit']:.2g})" if check is not None else
                    ", onnxruntime not checked"))
    lines.extend(shape_lines(report.get("shapes")))
    pretrained = report.get("hf_pretrained")
    if pretrained:
        lines.append(f"  from_pretrained folder: {pretrained['folder']} (reloaded, max abs diff {pretrained['max_abs_diff']:.2g})"
                     if pretrained["written"] else f"  no from_pretrained folder: {pretrained['why']}")
    files = report["files"]
    if "dense_onnx_bytes" in files:
        lines.append(f"  size {files['onnx_bytes'] / 1e6:.2f} MB vs dense export {files['dense_onnx_bytes'] / 1e6:.2f} MB "
                     f"({report['size_ratio']:.3f}x)")
        lines.append(f"  onnxruntime latency {report['latency_ms']['shrunk']:.3f} ms vs {report['latency_ms']['dense']:.3f} ms "
                     f"dense ({report['latency_ratio']:.2f}x)"
                     + "".join(f"; {label} {report[key + '_ms']['shrunk']:.3f} ms vs {report[key + '_ms']['dense']:.3f} ms "
                               f"({report[key + '_ratio']:.2f}x)" for key, label in
                               (("latency_one_example", "one example"),
                                ("latency_one_example_one_thread", "one example on one thread"))
                               if key + "_ms" in report))
    print("\n".join(lines))


def shape_lines(shapes: dict | None) -> list[str]:
    """The inputs' sizes the file serves: dynamic dimensions with the sizes they were checked at,
    and the fixed ones with their size and why.

    >>> shape_lines({"inputs": {"input_ids": ["s0", 8]}, "dynamic_checked_at": {"s0": [3, 4]},
    ...              "fixed": [{"input": "input_ids", "dim": 1, "size": 8, "why": "torch.export specialised it"}]})
    ['  inputs: input_ids [s0, 8]; s0 dynamic, checked at 3 and 4', '  fixed: input_ids dim 1 at 8 (torch.export specialised it)']
    """
    if not shapes:
        return []
    dims = "; ".join(f"{name} [{', '.join(str(s) for s in sizes)}]" for name, sizes in shapes["inputs"].items())
    symbols = dict.fromkeys(s for sizes in shapes["inputs"].values() for s in sizes if isinstance(s, str))
    checked = shapes.get("dynamic_checked_at", {})
    notes = [f"{s} dynamic, checked at {' and '.join(map(str, checked[s]))}" if s in checked else f"{s} dynamic, not checked"
             for s in symbols]
    lines = [f"  inputs: {dims}" + "".join(f"; {n}" for n in notes)]
    lines += [f"  fixed: {f['input']} dim {f['dim']} at {f['size']} ({f['why']})" for f in shapes.get("fixed", [])]
    return lines
