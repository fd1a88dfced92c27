"""GATr speed and memory vs a plain transformer of the same width and depth (forward + backward).

    python benchmarks/bench_gatr.py --device cuda --tokens 1024 4096 16384 --out results.json
    python benchmarks/bench_gatr.py --device cuda --tokens 1024 4096 16384 --compile-only --out compiled.json
    python benchmarks/bench_gatr.py --device cuda --tokens 1024 4096 16384 --cuda-graphs --out with_graphs.json
    python benchmarks/bench_gatr.py --device cpu --tokens 64 128 --mv-channels 4 --s-channels 8 --blocks 2   # smoke test

One training step (forward, mean of the outputs, backward) over ``batch`` sets of ``tokens``
items with full self-attention. GATr: ``--mv-channels`` multivector and ``--s-channels``
scalar hidden channels, ``--blocks`` blocks, ``--heads`` heads (:class:`equiformer.ga.GATr`).
Transformer: width ``16 * mv_channels + s_channels`` (the number of reals in GATr's hidden
state), the same depth and heads, MLP ratio ``--mlp-ratio``
(:class:`equiformer.models.baselines.TransformerEncoder`). Both run attention through
``torch.nn.functional.scaled_dot_product_attention``; which SDPA kernels accept each model's
query/key/value sizes is probed and reported (``sdpa`` column: flash / efficient / cudnn /
math), because a kernel that rejects a size silently falls back to the O(N^2)-memory math path.

Precisions: ``fp32`` (TF32 matmuls allowed on GPU unless ``--no-tf32``) and ``bf16`` (autocast).
Reported per row: ms per step (median of ``--repeats``), tokens/s, peak memory (CUDA only), and
the ratio GATr time / transformer time (the goal is <= 1.5). Out-of-memory and other failures
are recorded in the row instead of stopping the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from equiformer.ga import GATr, embed_point
from equiformer.ga.attention import sdpa_head_width
from equiformer.models.baselines import TransformerEncoder

PRECISIONS = ("fp32", "bf16")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=1, help="sets (sequences) per step")
    p.add_argument("--mv-channels", type=int, default=16)
    p.add_argument("--s-channels", type=int, default=128)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-mv", type=int, default=None, help="GATr multivector channels per head (default mv/heads)")
    p.add_argument("--head-s", type=int, default=None, help="GATr scalar channels per head (default s/heads)")
    p.add_argument("--mlp-ratio", type=float, default=2.0, help="transformer MLP width / model width (GATr's MLP is 2x)")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--compile", action="store_true", help="also run torch.compile'd models")
    p.add_argument("--compile-only", action="store_true", help="run only torch.compile'd models")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also run each step as one captured CUDA graph (no launch overhead; CUDA only)")
    p.add_argument("--models", nargs="+", default=["gatr", "transformer"], choices=["gatr", "transformer"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-tf32", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON file of all rows")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ models


def gatr_dims(args: argparse.Namespace) -> dict[str, int]:
    hm = args.head_mv or max(1, args.mv_channels // args.heads)
    hs = args.head_s if args.head_s is not None else max(1, args.s_channels // args.heads)
    return {"head_mv": hm, "head_s": hs, "qk": 8 * hm + 5 * hm + hs, "v": 16 * hm + hs}


def build(name: str, args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, Callable[[], tuple]]:
    """Model and a function returning its random inputs for one step."""
    b, n = args.batch, args.tokens_now
    g = torch.Generator(device="cpu").manual_seed(0)
    if name == "gatr":
        dims = gatr_dims(args)
        model = GATr(in_mv_channels=1, out_mv_channels=1, hidden_mv_channels=args.mv_channels, in_s_channels=1,
                     out_s_channels=1, hidden_s_channels=args.s_channels, num_blocks=args.blocks,
                     num_heads=args.heads, head_mv_channels=dims["head_mv"], head_s_channels=dims["head_s"])
        pts = torch.randn(b, n, 3, generator=g)
        mv = embed_point(pts).unsqueeze(-2).to(device)
        s = torch.randn(b, n, 1, generator=g).to(device)
        return model.to(device), lambda: (mv, s)
    width = 16 * args.mv_channels + args.s_channels
    model = TransformerEncoder(7, 3, dim=width, num_blocks=args.blocks, num_heads=args.heads, mlp_ratio=args.mlp_ratio)
    x = torch.randn(b, n, 7, generator=g).to(device)
    return model.to(device), lambda: (x,)


def _outputs_mean(out: Any) -> torch.Tensor:
    if isinstance(out, tuple):
        return sum(o.float().mean() for o in out if o.numel())
    return out.float().mean()


def sdpa_backends(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> str:
    """SDPA kernels that accept this model's per-head q/k/v sizes (forward + backward on a small probe)."""
    if device.type != "cuda":
        return "cpu"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "gatr":  # the padded head size GATr really hands to SDPA
        d = gatr_dims(args)
        qk = v = sdpa_head_width(d["qk"], d["v"])
    else:
        qk = v = (16 * args.mv_channels + args.s_channels) // args.heads
    ok = []
    for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                           ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        q = torch.randn(1, args.heads, 256, qk, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(1, args.heads, 256, qk, device=device, dtype=dtype, requires_grad=True)
        val = torch.randn(1, args.heads, 256, v, device=device, dtype=dtype, requires_grad=True)
        try:
            with sdpa_kernel([backend]), warnings_off():
                F.scaled_dot_product_attention(q, k, val).sum().backward()
            ok.append(label)
        except RuntimeError:
            pass
    return "+".join(ok) if ok else "math only"


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    # cache_enabled=False: autocast's weight-cast cache must not outlive a captured CUDA graph
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def time_step(model: torch.nn.Module, inputs: Callable[[], tuple], device: torch.device, precision: str,
              warmup: int, repeats: int, cuda_graph: bool = False) -> tuple[float, float | None]:
    """(median seconds per forward+backward step, peak memory in GiB or None on CPU).

    ``cuda_graph``: after the warm-up (on a side stream), the whole step (forward, loss, backward
    into the parameters' ``.grad``) is captured once as a CUDA graph and the timed steps replay
    it: the same kernels without Python, dispatcher and launch overhead. The peak memory then
    covers warm-up, capture and replays.
    """
    def step() -> None:
        with _autocast(device, precision):
            loss = _outputs_mean(model(*inputs()))
        loss.backward()

    def zero_grads() -> None:
        for p in model.parameters():
            p.grad = None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if cuda_graph:
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need --device cuda")
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 2)):
                step()
                zero_grads()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # grads are None here, so the captured backward allocates them in the graph's pool
            step()
        run = graph.replay
    else:
        def run() -> None:
            step()
            zero_grads()

        for _ in range(warmup):
            run()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


MODES = ("eager", "compile", "cuda-graph")


def run_row(name: str, args: argparse.Namespace, device: torch.device, precision: str, mode: str) -> dict[str, Any]:
    """One (model, tokens, precision, mode) measurement; ``mode`` is one of :data:`MODES`."""
    compiled = mode == "compile"
    row: dict[str, Any] = {"model": name, "tokens": args.tokens_now, "batch": args.batch, "precision": precision,
                           "mode": mode, "compile": compiled}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    row["sdpa"] = sdpa_backends(name, args, device, dtype)
    model = None
    try:
        model, inputs = build(name, args, device)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        fn = torch.compile(model) if compiled else model
        sec, peak = time_step(fn, inputs, device, precision, args.warmup, args.repeats, cuda_graph=mode == "cuda-graph")
        row.update(ms=1e3 * sec, tokens_per_s=args.batch * args.tokens_now / sec, peak_gib=peak)
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as e:  # record and go on: one failing configuration should not hide the rest
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if compiled:
            torch._dynamo.reset()
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratio`` = GATr ms / transformer ms for matching (tokens, precision, mode)."""
    ref = {(r["tokens"], r["precision"], r["mode"]): r for r in rows if r["model"] == "transformer" and "ms" in r}
    for r in rows:
        t = ref.get((r["tokens"], r["precision"], r["mode"]))
        if r["model"] == "gatr" and "ms" in r and t is not None:
            r["ratio_vs_transformer"] = r["ms"] / t["ms"]


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    width = 16 * args.mv_channels + args.s_channels
    d = gatr_dims(args)
    head = (f"GATr {args.mv_channels} mv + {args.s_channels} s channels vs transformer width {width}; "
            f"{args.blocks} blocks, {args.heads} heads, batch {args.batch}; GATr per-head q/k {d['qk']}, v {d['v']}; "
            f"forward+backward, median of {args.repeats}\n\n")
    lines = ["| model | tokens | precision | mode | ms / step | tokens/s | peak GiB | GATr / transformer | SDPA kernels |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tokens']} | {r['precision']} | {r['mode']} | {r['error']} | – | – | – | {r['sdpa']} |")
            continue
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "–"
        ratio = f"{r['ratio_vs_transformer']:.2f}" if "ratio_vs_transformer" in r else "–"
        lines.append(f"| {r['model']} | {r['tokens']} | {r['precision']} | {r['mode']} | {r['ms']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {peak} | {ratio} | {r['sdpa']} |")
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gatr: error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
    rows = []
    modes = ["compile"] if args.compile_only else ["eager"] + (["compile"] if args.compile else [])
    if args.cuda_graphs:
        modes.append("cuda-graph")
    for mode in modes:
        for precision in args.precisions:
            for n in args.tokens:
                args.tokens_now = n
                for name in args.models:
                    row = run_row(name, args, device, precision, mode)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    add_ratios(rows)
    table = markdown(rows, args)
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
           "threads": torch.get_num_threads()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        cfg = {k: v for k, v in vars(args).items() if k != "tokens_now"}
        Path(args.out).write_text(json.dumps({"rows": rows, "args": cfg, "env": env, "table": table}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
