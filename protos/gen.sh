#!/bin/sh
# Regenerate the Python stubs from protos/pdserve/v1/*.proto (run from the repo root).
set -e
python -m grpc_tools.protoc -Iprotos --python_out=protos --grpc_python_out=protos --pyi_out=protos protos/pdserve/v1/generation.proto
# grpc_tools writes `from pdserve.v1 import ...`; inside this repo the package is protos.pdserve.v1
sed -i 's/^from pdserve\.v1 import/from protos.pdserve.v1 import/' protos/pdserve/v1/generation_pb2_grpc.py
