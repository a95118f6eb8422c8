#!/usr/bin/env bash
# Regenerates every stub from protos/: Python (+ .pyi) for all packages, Go for the public API
# (pagedserve/v1) only, since no Go code speaks the internal protocols. The one command behind
# `make proto`.
#
#   bash protos/generate.sh [OUTDIR]     # OUTDIR defaults to clients/
#
# Writes OUTDIR/python/pagedserve/... and OUTDIR/go/src/pagedserve/v1/... (GOPATH layout: the Go import
# path is each file's go_package, so OUTDIR/go is a GOPATH entry). Tests generate into a temporary
# OUTDIR and compare it with clients/ byte for byte, so the output must depend only on the .proto
# files and the tool versions: grpcio-tools from the venv; protoc, protoc-gen-go and
# protoc-gen-go-grpc from Debian bookworm (protoc's version is written into each .pb.go header).
#
# Environment: PY picks the Python with grpcio-tools (default .venv/bin/python); LANGS picks the
# languages (default "python go"; LANGS=python where the Go tools are not installed).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LANGS=${LANGS:-python go}
OUT=${1:-clients}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Under -I protos each file's name is its path below protos/ (pagedserve/v1/generation.proto), which
# the stubs use as their import path. Sorted so that the protoc command line is always the same.
mapfile -t PROTOS < <(find protos/pagedserve -name '*.proto' | LC_ALL=C sort)
mapfile -t PUBLIC_PROTOS < <(find protos/pagedserve/v1 -name '*.proto' | LC_ALL=C sort)

for lang in $LANGS; do
  case $lang in
    python)
      mkdir -p "$OUT/python"
      # Stubs of protos that were removed or renamed must not linger.
      if [[ -d $OUT/python/pagedserve ]]; then
        find "$OUT/python/pagedserve" -type f \
          \( -name '*_pb2.py' -o -name '*_pb2.pyi' -o -name '*_pb2_grpc.py' \) -delete
      fi
      "$PY" -m grpc_tools.protoc -I protos \
        --python_out="$OUT/python" --pyi_out="$OUT/python" --grpc_python_out="$OUT/python" \
        "${PROTOS[@]}"
      ;;
    go)
      for tool in protoc protoc-gen-go protoc-gen-go-grpc; do
        if ! command -v "$tool" >/dev/null; then
          echo "generate.sh: $tool not found; apt-get install protobuf-compiler protoc-gen-go" \
            "protoc-gen-go-grpc (or run with LANGS=python)" >&2
          exit 1
        fi
      done
      mkdir -p "$OUT/go/src"
      if [[ -d $OUT/go/src/pagedserve ]]; then
        find "$OUT/go/src/pagedserve" -type f -name '*.pb.go' -delete
      fi
      protoc -I protos --go_out="$OUT/go/src" --go-grpc_out="$OUT/go/src" "${PUBLIC_PROTOS[@]}"
      ;;
    *)
      echo "generate.sh: unknown language '$lang' in LANGS (python, go)" >&2
      exit 1
      ;;
  esac
done
