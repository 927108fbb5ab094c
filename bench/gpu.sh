#!/usr/bin/env bash
# The GPU checks of records mode in one command (~6-8 min on one H200), for a machine with a CUDA
# device (the project's device tool, when a task is lent one):
#
#   run(command="bash bench/gpu.sh", carry=["evalstream/v1"], timeout_s=560)
#
# 1. the CUDA tests: records through pinned buffers and an event equal the CPU engine's, add()
#    never synchronizes (torch.cuda.set_sync_debug_mode("error") around it), pinned buffers reused;
# 2. benchmark 2 with CUDA tensors (bench.records --device cuda): the logits path against the
#    client's engine on the device, at C=3,000 and C=131,072 bfloat16, with the engine's own GPU
#    cost a sample. Targets (issue 11): >= 1M samples/s at 3,000, >= 100k at 131,072.
#
# The machine's python3 holds torch (CUDA), grpcio, protobuf, numpy, prometheus-client, pytest and
# hypothesis; the package itself is installed from this tree into /tmp/site without fetching
# anything. The generated protobuf modules (evalstream/v1, ignored by git) must travel with the
# tree: `carry=["evalstream/v1"]` (make them here first: `make evalstream/v1/service_pb2.py`).
# The stubs are made here with protobuf's code generator, whose runtime check wants that machine's
# protobuf at least as new as this one's; if the import check below fails on that, carry the
# matching protobuf wheel as the device tool's notes describe (`.whl`).
# Figures are printed and written to $OUT (when set) as records_cuda.json and gpu.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1

if [ ! -f evalstream/v1/service_pb2.py ]; then
  echo "evalstream/v1/service_pb2.py is missing: run make evalstream/v1/service_pb2.py here and carry evalstream/v1"
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# The installed layout (service/ -> evalstream.service, client/ -> evalstream.client) without a build
# (setup.py would regenerate the stubs with grpcio-tools, which that machine lacks).
rm -rf /tmp/site && mkdir -p /tmp/site/evalstream || exit 3
cp -r evalstream/. /tmp/site/evalstream/ && ln -s "$PWD/service" /tmp/site/evalstream/service \
  && ln -s "$PWD/client" /tmp/site/evalstream/client || exit 3
export PYTHONPATH=/tmp/site:$PWD
$PY - <<'PYEOF' || exit 4
import torch, grpc, google.protobuf, evalstream.client, evalstream.service.records_wire
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
print("evalstream from", evalstream.client.__file__)
print("grpcio", grpc.__version__, "protobuf", google.protobuf.__version__)
PYEOF

echo "== 1. CUDA tests"
timeout 200 $PY -m pytest -q -rs -p no:cacheprovider -o addopts="" \
  tests/client/test_cuda_records.py \
  "tests/client/test_reduce_mode.py::test_cuda_scores_are_reduced_on_the_device_without_add_synchronizing"
tests_rc=$?

echo "== 2. end to end with CUDA tensors (C=3,000 and 131,072 bfloat16)"
timeout 330 $PY -m bench.records --parts e2e --device cuda --repeats 2 --e2e-mib 1024 \
  --cases 3000:bfloat16,131072:bfloat16
bench_rc=$?
cp bench/results/records_cuda.json "$OUT/" 2>/dev/null || true
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
