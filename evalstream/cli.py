"""The ``evalstream`` command: serve, list, show, compare, demo.

Connection options (``--target``, ``--token``, TLS files) work on every
command and default to ``EVALSTREAM_TARGET`` / ``EVALSTREAM_TOKEN`` so a CI job
sets them once. Every read command prints a table, or JSON with ``--json``.
Exit status: 0 on success, 1 when the service refuses or cannot be reached,
2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict

from evalstream.client import DEFAULT_TARGET, EvalClient, EvalStreamError, RetryPolicy, TLSConfig


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection")
    g.add_argument(
        "--target",
        default=os.environ.get("EVALSTREAM_TARGET", DEFAULT_TARGET),
        help="server host:port (default: $EVALSTREAM_TARGET or %(default)s)",
    )
    g.add_argument(
        "--token", default=os.environ.get("EVALSTREAM_TOKEN"), help="bearer token ($EVALSTREAM_TOKEN)"
    )
    g.add_argument("--ca-cert", help="PEM root certificate: connect with TLS")
    g.add_argument("--client-cert", help="PEM client certificate (mutual TLS)")
    g.add_argument("--client-key", help="PEM client private key (mutual TLS)")
    g.add_argument("--server-name", help="name to verify in the server certificate")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default: %(default)s)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _connection_options()
    parser = argparse.ArgumentParser(
        prog="evalstream", description="Streaming evaluation of many-class classifiers over gRPC."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server (blocks until SIGTERM/SIGINT)")
    serve.add_argument("--config", default=os.environ.get("EVALSTREAM_CONFIG"), help="TOML or YAML settings")
    serve.add_argument("--address", help="gRPC host:port to listen on (overrides grpc_address)")
    serve.add_argument("--port", type=int, help="gRPC port, keeping the configured host")
    serve.add_argument("--data-dir", help="database and records directory (overrides data_dir)")
    serve.add_argument("--metrics-address", help="Prometheus host:port; empty disables it")
    serve.add_argument(
        "--warm",
        metavar="C:DTYPE[,C:DTYPE...]",
        help="compile the engine's kernels for these class counts and score dtypes at start, "
        "e.g. 3000:float32,3000:bfloat16 (overrides warm_kernels)",
    )

    ls = sub.add_parser("list", parents=[common], help="list evaluations, newest first")
    ls.add_argument("--run", default="")
    ls.add_argument("--model", default="")
    ls.add_argument("--split", default="")
    ls.add_argument("--limit", type=int, default=50, help="at most this many rows (default: %(default)s)")
    ls.add_argument("--json", action="store_true", help="print JSON")

    show = sub.add_parser("show", parents=[common], help="one evaluation: loss, accuracy, calibration, ...")
    show.add_argument("run")
    show.add_argument("model")
    show.add_argument("--step", type=int, help="training step (default: the latest)")
    show.add_argument("--split", default="")
    show.add_argument("--per-class", action="store_true", help="include per-class counts (JSON only)")
    show.add_argument("--json", action="store_true", help="print JSON")

    cmp = sub.add_parser(
        "compare", parents=[common], help="rank models by a metric, with confidence intervals"
    )
    cmp.add_argument("run")
    cmp.add_argument("models", nargs="*", metavar="MODEL", help="models to compare (default: all of the run)")
    cmp.add_argument("--step", type=int, help="compare this step of every model (default: each one's latest)")
    cmp.add_argument("--split", default="")
    cmp.add_argument("--metric", default="", help="primary metric (default: the server's, usually nll)")
    cmp.add_argument("--replicates", type=int, default=0, help="bootstrap replicates (default: the server's)")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument(
        "--recommendation",
        choices=("off", "advisory", "on"),
        default="",
        help="lead with the model to pick (on), report it as advice (advisory) or not at all "
        "(default: the server's, usually on)",
    )
    cmp.add_argument("--json", action="store_true", help="print JSON")
    cmp.add_argument("--plot", metavar="FILE.png", help="also save a comparison chart (needs matplotlib)")

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="stream a synthetic 3,000-class set for three models and compare them",
        description="Starts a server in-process unless --target is given explicitly.",
    )
    demo.add_argument("--samples", type=int, default=30_000, help="validation samples (default: %(default)s)")
    demo.add_argument("--classes", type=int, default=3_000, help="classes (default: %(default)s)")
    demo.add_argument(
        "--ranks", type=int, default=2, help="ranks streaming each model (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--reduce",
        choices=("mixed", "client", "server", "auto"),
        default="mixed",
        help="where scores become records: mixed (even ranks on the client, odd ranks on the server; "
        "default), client, server or auto",
    )
    demo.add_argument("--run", default="", help="run name (default: demo-<time>)")
    demo.add_argument("--json", action="store_true", help="print JSON instead of tables")
    demo.add_argument("--plot", metavar="FILE.png", help="also save a comparison chart (needs matplotlib)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def _client(args: argparse.Namespace) -> EvalClient:
    tls = None
    if args.ca_cert or args.client_cert or args.client_key:
        tls = TLSConfig(args.ca_cert, args.client_cert, args.client_key, args.server_name)
    # A person is waiting: retry a restart blip, but report a server that is down within a second.
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.2)
    return EvalClient(args.target, credentials=tls, token=args.token, timeout=args.timeout, retry=retry)


def _to_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def cmd_serve(args: argparse.Namespace) -> int:
    from evalstream.service.server import serve_checked
    from evalstream.service.settings import Settings, replace

    def load() -> Settings:
        settings = Settings.load(args.config)
        changes: dict[str, Any] = {}
        if args.address:
            changes["grpc_address"] = args.address
        elif args.port is not None:
            host = settings.grpc_address.rsplit(":", 1)[0]
            changes["grpc_address"] = f"{host}:{args.port}"
        if args.data_dir:
            changes["data_dir"] = args.data_dir
        if args.metrics_address is not None:
            changes["metrics_address"] = args.metrics_address
        if args.warm is not None:
            changes["warm_kernels"] = tuple(w for w in args.warm.split(",") if w.strip())
        return replace(settings, **changes) if changes else settings

    # A configuration mistake ends here with one line on stderr and status 2, before anything starts.
    return serve_checked(load, "evalstream serve")


def cmd_list(args: argparse.Namespace) -> int:
    from evalstream.client.render import render_list

    with _client(args) as client:
        evaluations = client.list(run=args.run, model=args.model, split=args.split, limit=args.limit)
    if args.json:
        _print_json([_to_dict(e) for e in evaluations])
    else:
        print(render_list(evaluations))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from evalstream.client.render import render_evaluation

    with _client(args) as client:
        evaluation = client.get(
            args.run, args.model, step=args.step, split=args.split, include_per_class=args.per_class
        )
    if args.json:
        _print_json(_to_dict(evaluation))
    else:
        print(render_evaluation(evaluation))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.compare(
            args.run,
            args.models,
            split=args.split,
            step=args.step,
            primary_metric=args.metric,
            bootstrap_replicates=args.replicates,
            seed=args.seed,
            recommendation=args.recommendation,
        )
        # Only the plot reads the candidates' evaluations, keyed by evaluation id as compare_view
        # expects (two candidates may share a model name).
        evaluations = (
            {
                c.evaluation_id: client.get(c.ref.run, c.ref.model, step=c.ref.step, split=c.ref.split)
                for c in response.candidates
            }
            if args.plot
            else {}
        )
    if args.json:
        _print_json(_to_dict(response))
    else:
        from evalstream.client.compare_view import render_comparison

        print(render_comparison(response))
    if args.plot:
        from evalstream.client.compare_view import plot_comparison

        plot_comparison(response, evaluations, args.plot)
        print(f"chart saved to {args.plot}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from evalstream.client.demo import DemoConfig, demo_json, render_demo, run_demo

    config = DemoConfig(
        num_samples=args.samples,
        num_classes=args.classes,
        seed=args.seed,
        world_size=args.ranks,
        run=args.run,
        reduce=args.reduce,
    )
    if args.target_given:
        with _client(args) as client:
            result = run_demo(client, config, progress=not args.no_progress)
    else:
        from evalstream.service.server import BackgroundServer
        from evalstream.service.settings import Settings

        with tempfile.TemporaryDirectory(prefix="evalstream-demo-") as data_dir:
            # Self-contained: the caller's EVALSTREAM_* server settings (TLS, ports) do not apply.
            settings = Settings.load(
                env={}, grpc_address="127.0.0.1:0", metrics_address="", data_dir=data_dir
            )
            with BackgroundServer(settings) as server:
                print(f"started an in-process server on {server.target}", file=sys.stderr)
                with EvalClient(server.target, timeout=args.timeout) as client:
                    result = run_demo(client, config, progress=not args.no_progress)
    if args.json:
        _print_json(demo_json(result))
    else:
        from evalstream.client.compare_view import render_comparison

        print(render_demo(result, render_comparison(result.comparison)))
    if args.plot:
        from evalstream.client.compare_view import plot_comparison

        by_id = {e.evaluation_id: e for e in result.evaluations.values()}
        plot_comparison(result.comparison, by_id, args.plot)
        print(f"chart saved to {args.plot}", file=sys.stderr)
    return 0


COMMANDS = {"serve": cmd_serve, "list": cmd_list, "show": cmd_show, "compare": cmd_compare, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # The demo starts its own server unless a target is named explicitly.
    args.target_given = any(a == "--target" or a.startswith("--target=") for a in argv) or (
        "EVALSTREAM_TARGET" in os.environ
    )
    try:
        return COMMANDS[args.command](args)
    except EvalStreamError as exc:
        print(f"evalstream {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
