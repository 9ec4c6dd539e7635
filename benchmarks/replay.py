"""Kernel time without host time, for the cases whose timing measures the host.

A row is "host_bound" when issuing one call from Python takes most of its
measured time (harness.HOST_BOUND): its `ms` is what a user's eager loop
sees, but says little about the kernels (the small sizes). Each provider of
such a case is timed again as a CUDA graph: the call captured once, then
the graph replayed, each replay issued while the GPU clears L2 (a 256 MB
memset, not timed, as do_bench does), so no launch gap falls inside the
timed span. A model that runs under CUDA graphs (torch.compile's
"reduce-overhead", vLLM-style decoding) sees this time. A provider that
cannot be captured (it synchronises, or steps an optimizer made without
capturable=True) says why in `graph_error`.
"""
import statistics
from typing import Callable, Dict, List, Optional

import torch

REPLAYS = 50  # at least this many timed replays a provider, at most 10 times as many
REPLAY_MS = 20  # and as many more as fit in this many milliseconds of kernels


def replay_ms(fn: Callable[[], object]) -> List[float]:
    """(median, 20th, 80th percentile) ms of one replay of fn captured in a
    CUDA graph. The capture runs on a side stream after a warm-up call there
    (as torch's CUDA-graph notes ask), and the stream is restored whether or
    not the capture succeeds."""
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # a timed backward alone replays a forward built once, and a backward runs on its forward's
        # stream: that forward is built again on this one (harness.autograd_callable), outside the capture
        getattr(fn, "forget_forward", lambda: None)()
        fn()
        torch.cuda.synchronize()
        graph.capture_begin()
        try:
            fn()
        except Exception:
            try:  # ends the capture; the call's own error, raised below, says why it failed
                graph.capture_end()
            except RuntimeError:
                pass
            raise
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    l2_sized = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    count = max(REPLAYS, min(10 * REPLAYS, int(REPLAY_MS / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
    for start, end in events:
        l2_sized.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    del graph
    return [statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]]


def retime_host_bound(rows: List[dict], providers: Dict[str, object],
                      context_broken: Callable[[], bool]) -> Optional[str]:
    """Where any timed row of a case is host_bound, every timed row gets
    graph_ms (and _p20, _p80) or graph_error. Returns what broke the CUDA
    context if a capture did (the rows after it then go untimed), else None."""
    if not any(r.get("host_bound") for r in rows):
        return None
    for r in rows:
        if "ms" not in r:
            continue
        try:
            med, lo, hi = replay_ms(providers[r["provider"]])
        except Exception as e:  # not capturable: says why, the row keeps its eager time
            r["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            if context_broken():
                return f"{r['provider']}'s CUDA-graph capture: {r['graph_error']}"
        else:
            r.update(graph_ms=med, graph_ms_p20=lo, graph_ms_p80=hi)
        torch.cuda.empty_cache()
    return None
