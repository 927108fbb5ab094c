"""evalstream/wire follows the .proto: its field numbers are the descriptors', under any numbering.

The module writes and reads chunk requests by hand, so a field renumbered in
proto/evalstream/v1 would silently corrupt every chunk if the module kept numbers of its own. Here
the contract is compiled again with every field the module touches renumbered (and once with a
field retyped), and a fresh interpreter loads those stubs in place of the real ones: the module's
bytes must still be protobuf's, protobuf's bytes must still read alike, and a retyped field must
stop the import. ``make breaking`` keeps such changes out of the real contract; this keeps the
module honest about where its numbers come from.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc_tools
import pytest
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]

# (file, message, field, new number): every field evalstream/wire reads or writes.
RENUMBERED = [
    ("service.proto", "StreamEvaluationRequest", "chunk", 9),
    ("service.proto", "Chunk", "sequence", 21),
    ("service.proto", "Chunk", "scores", 17),
    ("service.proto", "Chunk", "labels", 300),
    ("service.proto", "Chunk", "sample_ids", 5),
    ("tensor.proto", "Tensor", "dtype", 6),
    ("tensor.proto", "Tensor", "shape", 2047),
    ("tensor.proto", "Tensor", "raw_contents", 16),
]

CHECK = textwrap.dedent(
    """
    import sys
    import numpy as np
    import evalstream.v1

    evalstream.v1.__path__[:] = [sys.argv[1]]  # the renumbered stubs, before anything loads the real ones
    from evalstream import wire
    from evalstream.v1 import service_pb2, tensor_pb2

    numbers = {
        name: getattr(wire, name)
        for name in ("REQUEST_CHUNK", "CHUNK_SEQUENCE", "CHUNK_SCORES", "CHUNK_LABELS",
                     "CHUNK_SAMPLE_IDS", "TENSOR_DTYPE", "TENSOR_SHAPE", "TENSOR_RAW")
    }
    print(sorted(numbers.values()))
    scores = np.arange(6, dtype="<f4").reshape(2, 3)
    labels = np.array([2, 0], "<i8")
    for ids in (None, np.array([7, 1 << 40], "<i8")):
        data = wire.encode_chunk_request(
            1 << 33,
            wire.WireTensor(tensor_pb2.DATA_TYPE_FLOAT32, scores),
            wire.WireTensor(tensor_pb2.DATA_TYPE_INT64, labels),
            None if ids is None else wire.WireTensor(tensor_pb2.DATA_TYPE_INT64, ids),
        )
        chunk = service_pb2.Chunk(
            sequence=1 << 33, scores=wire.encode_tensor(scores), labels=wire.encode_tensor(labels)
        )
        if ids is not None:
            chunk.sample_ids.CopyFrom(wire.encode_tensor(ids))
        request = service_pb2.StreamEvaluationRequest(chunk=chunk)
        assert data == request.SerializeToString(), "encoded bytes differ from protobuf's"
        parsed = wire.parse_chunk_request(data)
        assert parsed is not None, "the module does not read protobuf's plain chunk"
        assert (parsed.sequence, parsed.scores.shape) == (1 << 33, (2, 3))
        assert bytes(parsed.scores.raw) == scores.tobytes() and bytes(parsed.labels.raw) == labels.tobytes()
        assert parsed.labels.dtype == tensor_pb2.DATA_TYPE_INT64
        assert (parsed.sample_ids is None) == (ids is None)
        opened = service_pb2.StreamEvaluationRequest(open=service_pb2.OpenShard(num_classes=3))
        assert wire.parse_chunk_request(opened.SerializeToString()) is None
    print("ok")
    """
)


def _compile(
    tmp_path: Path, edit: dict[str, list[tuple[str, str, int]]], retype: tuple[str, str] = ("", "")
) -> Path:
    """proto/ copied and edited (fields renumbered, ``retype`` applied), compiled into tmp_path/out."""
    src = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", src)
    for name, fields in edit.items():
        path = src / "evalstream" / "v1" / name
        text = path.read_text()
        for message, field, number in fields:
            block = re.search(rf"message {message} {{.*?\n}}", text, re.S)
            assert block, message
            body, n = re.subn(rf"(\b{field} = )\d+;", rf"\g<1>{number};", block.group(0))
            assert n == 1, (message, field)
            text = text.replace(block.group(0), body)
        if name == "service.proto":
            text = text.replace(*retype)
        path.write_text(text)
    out = tmp_path / "out"
    out.mkdir()
    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = [f"evalstream/v1/{p.name}" for p in sorted((src / "evalstream" / "v1").glob("*.proto"))]
    assert protoc.main(["protoc", f"-I{src}", f"-I{include}", f"--python_out={out}", *sources]) == 0
    return out / "evalstream" / "v1"


def _run(stubs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHECK, str(stubs)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def _by_file() -> dict[str, list[tuple[str, str, int]]]:
    edit: dict[str, list[tuple[str, str, int]]] = {}
    for file, message, field, number in RENUMBERED:
        edit.setdefault(file, []).append((message, field, number))
    return edit


def test_the_module_follows_a_renumbered_contract(tmp_path: Path) -> None:
    proc = _run(_compile(tmp_path, _by_file()))
    assert proc.returncode == 0, proc.stderr
    numbers, ok = proc.stdout.split("\n")[:2]
    assert numbers == str(sorted(n for *_, n in RENUMBERED)) and ok == "ok"


@pytest.mark.parametrize(
    "retype", [("uint64 sequence = 1;", "int64 sequence = 1;"), ("Tensor labels = 3;", "bytes labels = 3;")]
)
def test_a_field_the_module_cannot_follow_stops_its_import(tmp_path: Path, retype: tuple[str, str]) -> None:
    proc = _run(_compile(tmp_path, {"service.proto": []}, retype))
    assert proc.returncode != 0
    assert "changed its type or cardinality; evalstream/wire must follow" in proc.stderr


def test_the_wire_module_needs_no_torch() -> None:
    """Both directions run in a process without torch: numpy users and the CLI never load it."""
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from evalstream import wire
        import evalstream.client

        scores = np.ones((2, 3), "<f4")
        data = wire.encode_chunk_request(
            4, wire.WireTensor(1, scores), wire.WireTensor(5, np.array([0, 2], "<i8")), None
        )
        chunk = wire.parse_stream_request(data)
        assert isinstance(chunk, wire.RawChunk) and chunk.sequence == 4
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_values_are_judged_while_another_thread_imports_torch() -> None:
    """A half-imported torch (another thread inside ``import torch``) is treated as not imported.

    Ranks started on threads used to fail here with "partially initialized module 'torch' has no
    attribute 'Tensor'" when one thread's first ``add()`` of a tensor imported torch while another
    thread's ``add()`` of a numpy array asked whether its value was a tensor.
    """
    script = textwrap.dedent(
        """
        import sys, threading
        import numpy as np
        from evalstream import wire
        from evalstream.client.reduce import choose_mode, is_cuda_tensor

        importer = threading.Thread(target=lambda: __import__("torch"))
        importer.start()
        scores, checks, half_built = np.ones((2, 3), "<f4"), 0, 0
        while importer.is_alive():
            module = sys.modules.get("torch")
            half_built += module is not None and not hasattr(module, "cuda")
            assert not wire.is_tensor(scores) and not is_cuda_tensor(scores)
            assert choose_mode("auto", 10, "eager") == "server"
            checks += 1
        importer.join()
        import torch
        assert wire.is_tensor(torch.zeros(1)) and checks > 0
        print(half_built)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) > 0, "the checks never ran while torch was half imported"
