"""Transport ceiling: the best any Python gRPC service can do on this machine.

A client-streaming RPC whose server only counts bytes: no tensor decode, no
compute, no store. Server and client run in separate processes (as a training
job and evalstream do), over loopback. Two payload forms:

- ``raw``: identity (de)serialisers, the bytes as they are on the wire;
- ``proto``: the real ``evalstream.v1.StreamEvaluationRequest`` with a Chunk
  whose scores tensor carries the payload, parsed by protobuf on the server.

The end-to-end benchmark divides its throughput by this ceiling.
Run: ``python -m bench.transport [--seconds 3] [--sizes 262144,1048576,4194304,16777216]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from bench.common import table, write_json

RAW_METHOD = "/bench.Transport/Sink"
PROTO_METHOD = "/bench.Transport/SinkProto"
C = 3000  # bytes per sample at float32 = 12,000


def _serve(port_queue: Any) -> None:
    from evalstream.v1 import service_pb2

    def sink_raw(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = 0
        for msg in request_iterator:
            total += len(msg)
        return total.to_bytes(8, "little")

    def sink_proto(
        request_iterator: Iterator[service_pb2.StreamEvaluationRequest], context: grpc.ServicerContext
    ) -> bytes:
        total = 0
        for msg in request_iterator:
            total += len(msg.chunk.scores.raw_contents)
        return total.to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler(
        "bench.Transport",
        {
            "Sink": grpc.stream_unary_rpc_method_handler(sink_raw),
            "SinkProto": grpc.stream_unary_rpc_method_handler(
                sink_proto, request_deserializer=service_pb2.StreamEvaluationRequest.FromString
            ),
        },
    )
    opts = [("grpc.max_receive_message_length", 64 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=opts)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_queue.put(port)
    server.wait_for_termination()


def _stream(channel: grpc.Channel, form: str, size: int, seconds: float) -> tuple[int, float]:
    """Send messages of `size` payload bytes for about `seconds`; return (bytes, elapsed)."""
    from evalstream.v1 import service_pb2, tensor_pb2

    payload = bytes(size)
    if form == "raw":
        call = channel.stream_unary(RAW_METHOD, request_serializer=None, response_deserializer=None)
        msg: Any = payload
    else:
        call = channel.stream_unary(
            PROTO_METHOD, request_serializer=lambda m: m.SerializeToString(), response_deserializer=None
        )
        rows = max(1, size // (4 * C))
        msg = service_pb2.StreamEvaluationRequest(
            chunk=service_pb2.Chunk(
                sequence=0,
                scores=tensor_pb2.Tensor(
                    dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[rows, C], raw_contents=payload
                ),
            )
        )
    deadline = time.perf_counter() + seconds
    count = 0

    def gen() -> Iterator[Any]:
        nonlocal count
        while time.perf_counter() < deadline:
            count += 1
            yield msg

    start = time.perf_counter()
    reply = call(gen())
    elapsed = time.perf_counter() - start
    received = int.from_bytes(reply, "little")
    assert received == count * size, (received, count, size)
    return received, elapsed


def run(sizes: list[int], seconds: float, repeats: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(q,), daemon=True)
    proc.start()
    port = q.get(timeout=60)
    opts = [("grpc.max_send_message_length", 64 << 20)]
    rows: list[dict[str, Any]] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            for form in ("raw", "proto"):
                for size in sizes:
                    _stream(channel, form, size, 0.3)  # warm-up
                    rates = []
                    for _ in range(repeats):
                        nbytes, elapsed = _stream(channel, form, size, seconds)
                        rates.append(nbytes / elapsed)
                    med = statistics.median(rates)
                    rows.append(
                        {
                            "form": form,
                            "message_bytes": size,
                            "gb_per_s_median": med / 1e9,
                            "gb_per_s_min": min(rates) / 1e9,
                            "gb_per_s_max": max(rates) / 1e9,
                            "samples_per_s_c3000_f32": med / (4 * C),
                            "repeats": repeats,
                        }
                    )
    finally:
        proc.terminate()
        proc.join(5)
    return {"seconds_per_run": seconds, "rows": rows}


COLUMNS = [
    "form",
    "message_bytes",
    "gb_per_s_median",
    "gb_per_s_min",
    "gb_per_s_max",
    "samples_per_s_c3000_f32",
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="262144,1048576,4194304,16777216")
    args = ap.parse_args(argv)
    result = run([int(s) for s in args.sizes.split(",")], args.seconds, args.repeats)
    print(table(result["rows"], COLUMNS))
    write_json("transport", result)
    return result


if __name__ == "__main__":
    main()
