"""Generate the Python protobuf and gRPC stubs from proto/ into evalstream/v1/.

The stubs are build outputs: never edited, never committed. `make proto` and
the package build (setup.py) both call this.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(root: Path = ROOT) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency (grpcio-tools)

    proto_dir = root / "proto"
    sources = sorted(str(p.relative_to(proto_dir)) for p in (proto_dir / "evalstream" / "v1").glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    out = root / "evalstream" / "v1"
    (out / "__init__.py").write_text(
        '"""Generated from proto/evalstream/v1 by tools/gen_proto.py; do not edit."""\n'
    )
    (out / "py.typed").write_text("")
    return sorted(out.glob("*.py"))


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT), file=sys.stderr)
