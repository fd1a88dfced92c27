"""Where a GATr training step spends its GPU time: CUDA kernel time per layer type (forward) and
the top kernels (forward + backward), from ``torch.profiler``.

    python benchmarks/profile_gatr.py --device cuda --tokens 16384 --precision bf16 --out profile.json

Same model and inputs as ``bench_gatr.py`` (16 mv + 128 s channels, 10 blocks, 8 heads). Forward
time is attributed to the layer types through ``record_function`` ranges opened by module hooks
(the model is not modified); backward kernels are listed by name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gatr  # noqa: E402

LAYER_TYPES = ("EquiLinear", "GeometricBilinear", "EquiLayerNorm", "ScalarGatedGELU", "SelfAttention", "GradeDropout")


def _label_modules(model: torch.nn.Module) -> None:
    """Open a ``record_function`` range named after the layer type around each layer's forward."""
    def pre(mod, _inp):
        mod._prof_range = record_function(f"layer::{type(mod).__name__}")
        mod._prof_range.__enter__()

    def post(mod, _inp, _out):
        mod._prof_range.__exit__(None, None, None)

    for mod in model.modules():
        if type(mod).__name__ in LAYER_TYPES:
            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    bargs = bench_gatr._parse(["--device", args.device, "--tokens", str(args.tokens)])
    bargs.tokens_now = args.tokens
    model, inputs = bench_gatr.build("gatr", bargs, device)
    _label_modules(model)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            loss = bench_gatr._outputs_mean(model(*inputs()))
        loss.backward()
        for q in model.parameters():
            q.grad = None

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    dev_attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"

    def dev_us(e) -> float:
        return float(getattr(e, dev_attr, 0.0) or 0.0) if device.type == "cuda" else float(e.cpu_time_total)

    layers = {e.key[len("layer::"):]: dev_us(e) / 1e3 for e in events if e.key.startswith("layer::")}
    kernels = [e for e in events if not e.key.startswith(("layer::", "aten::", "autograd::", "cuda", "Optimizer"))
               and dev_us(e) > 0 and getattr(e, "self_device_time_total", 1)]
    total_ms = sum(float(getattr(e, "self_device_time_total", 0.0) or 0.0) for e in events) / 1e3
    top = sorted(kernels, key=dev_us, reverse=True)[: args.top]
    aten_calls = sum(e.count for e in events if e.key.startswith("aten::"))
    res = {"tokens": args.tokens, "precision": args.precision, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "gpu_ms_total": total_ms, "forward_ms_by_layer_type": layers, "aten_calls": aten_calls,
           "top_kernels": [{"name": e.key[:120], "ms": dev_us(e) / 1e3, "calls": e.count} for e in top]}
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
