#!/usr/bin/env bash
# Fetches the wheels that the GPU image lacks (it has Python 3.12, torch, triton and transformers, but
# no network), for tests/gpu/run_round.sh to install from .whl/. Run it from any checkout on a host
# that can reach PyPI, then carry .whl/ along with the working tree:
#
#   bash tests/gpu/fetch_wheels.sh [NAME ...]    # NAME: more distributions to fetch
#
# Versions are pyproject.toml's: a name it lists (in dependencies or an extra) is fetched with its
# specifier there (grpcio==..., pyzmq>=...), so no version is written twice; a name it does not list
# (googleapis-common-protos, which grpcio-status needs; extra names) is fetched at the newest version.
# Environment: PYTHON, an interpreter with pip and Python >= 3.11 (default python3); WHEEL_DIR (.whl).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
names=(grpcio grpcio-tools grpcio-health-checking grpcio-reflection grpcio-status googleapis-common-protos
  pyzmq msgpack structlog gguf prometheus-client xgrammar apache-tvm-ffi pydantic pydantic-core annotated-types
  typing-inspection "$@")
# Fetched with their dependencies, resolved by pip (their trees change between releases: pydantic pins its
# core exactly, openai moved from httpx to httpx2): the official client the HTTP API's tests speak with.
with_deps=(openai)

# One requirement per name: the name with pyproject.toml's specifier, or the bare name.
mapfile -t requirements < <("$PYTHON" - "${names[@]}" "${with_deps[@]}" <<'PY'
import re
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
listed = project.get("dependencies", []) + [r for extra in project.get("optional-dependencies", {}).values()
                                            for r in extra]


def key(name: str) -> str:  # PEP 503: case, '_' and '.' do not distinguish names
    return re.sub(r"[-_.]+", "-", name).lower()


specifier = {}
for requirement in listed:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)", requirement)
    specifier[key(m.group(1))] = m.group(2).split(";")[0].strip()
for name in sys.argv[1:]:
    print(name + specifier.get(key(name), ""))
PY
)

mkdir -p "$WHEEL_DIR"
echo "fetch_wheels.sh: ${requirements[*]} -> $WHEEL_DIR/"
# Binary wheels only, for CPython 3.12 on x86_64 Linux (the manylinux tags GPU images accept); no
# dependencies: the image has the rest, and names that it lacks go on the command line.
target=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
n=${#names[@]}
"$PYTHON" -m pip download --quiet --no-deps "${target[@]}" -d "$WHEEL_DIR" "${requirements[@]:0:n}"
"$PYTHON" -m pip download --quiet "${target[@]}" -d "$WHEEL_DIR" "${requirements[@]:n}"
ls "$WHEEL_DIR"
