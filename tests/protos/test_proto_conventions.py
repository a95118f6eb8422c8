"""The .proto files follow the contract conventions (DESIGN.md): package = directory, a comment on
every message, field, oneof, enum, enum value, service and method, and enum values prefixed with
the enum's name in upper snake case, the zero value being PREFIX_UNSPECIFIED."""

import re
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from proto_helpers import REPO

PROTOS = REPO / "protos"
# Field numbers of repeated fields in descriptor.proto; SourceCodeInfo paths are made of these.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE, SERVICE_METHOD = 2, 2


def load(proto_dir: Path, tmp_path: Path) -> list[descriptor_pb2.FileDescriptorProto]:
    """Compile every .proto under proto_dir with source info (comments) and return the files."""
    out = tmp_path / "protos.desc"
    names = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{proto_dir}", f"-I{well_known}", "--include_source_info",
            f"--descriptor_set_out={out}", *names]
    assert protoc.main(args) == 0, f"protoc failed on {names}"
    return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


def upper_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def check_enum(enum, where: str, commented) -> list[str]:
    problems = commented(where, f"enum {enum.name}")
    prefix = upper_snake(enum.name) + "_"
    zero = [v.name for v in enum.value if v.number == 0]
    if zero != [prefix + "UNSPECIFIED"]:
        problems.append(f"enum {enum.name}: zero value {zero} is not {prefix}UNSPECIFIED")
    for i, value in enumerate(enum.value):
        problems += commented(f"{where}.{ENUM_VALUE}.{i}", f"enum value {value.name}")
        if not value.name.startswith(prefix):
            problems.append(f"enum value {value.name}: not prefixed with {prefix}")
    return problems


def check_message(msg, where: str, commented) -> list[str]:
    problems = commented(where, f"message {msg.name}")
    for i, field in enumerate(msg.field):
        problems += commented(f"{where}.{MESSAGE_FIELD}.{i}", f"field {msg.name}.{field.name}")
    # proto3 `optional` fields live in synthetic oneofs that have no source of their own.
    synthetic = {f.oneof_index for f in msg.field if f.proto3_optional}
    for i, oneof in enumerate(msg.oneof_decl):
        if i not in synthetic:
            problems += commented(f"{where}.{MESSAGE_ONEOF}.{i}", f"oneof {msg.name}.{oneof.name}")
    for i, nested in enumerate(msg.nested_type):
        problems += check_message(nested, f"{where}.{MESSAGE_NESTED}.{i}", commented)
    for i, enum in enumerate(msg.enum_type):
        problems += check_enum(enum, f"{where}.{MESSAGE_ENUM}.{i}", commented)
    return problems


def check_file(fd: descriptor_pb2.FileDescriptorProto) -> list[str]:
    comments = {
        ".".join(map(str, loc.path)): loc.leading_comments.strip()
        for loc in fd.source_code_info.location
    }

    def commented(path: str, what: str) -> list[str]:
        return [] if comments.get(path) else [f"{what} has no comment"]

    problems = []
    if fd.package.replace(".", "/") != str(Path(fd.name).parent):
        problems.append(f"package {fd.package} does not match its directory")
    for i, msg in enumerate(fd.message_type):
        problems += check_message(msg, f"{FILE_MESSAGE}.{i}", commented)
    for i, enum in enumerate(fd.enum_type):
        problems += check_enum(enum, f"{FILE_ENUM}.{i}", commented)
    for i, service in enumerate(fd.service):
        problems += commented(f"{FILE_SERVICE}.{i}", f"service {service.name}")
        for j, method in enumerate(service.method):
            problems += commented(f"{FILE_SERVICE}.{i}.{SERVICE_METHOD}.{j}", f"rpc {method.name}")
    return [f"{fd.name}: {p}" for p in problems]


def test_protos_follow_conventions(tmp_path):
    files = load(PROTOS, tmp_path)
    assert {fd.name for fd in files} >= {"pagedserve/v1/generation.proto"}
    assert [p for fd in files for p in check_file(fd)] == []


def test_checker_reports_violations(tmp_path):
    proto_dir = tmp_path / "protos"
    (proto_dir / "demo" / "v1").mkdir(parents=True)
    (proto_dir / "demo" / "v1" / "bad.proto").write_text(
        'syntax = "proto3";\npackage demo.v2;\n'
        "// Color is commented.\nenum Color {\n  // Red is commented.\n  RED = 0;\n  COLOR_BLUE = 1;\n}\n"
        "message Bare {\n  // Commented.\n  string a = 1;\n  optional int32 b = 2;\n}\n"
    )
    problems = check_file(load(proto_dir, tmp_path)[0])
    assert problems == [
        "demo/v1/bad.proto: package demo.v2 does not match its directory",
        "demo/v1/bad.proto: message Bare has no comment",
        "demo/v1/bad.proto: field Bare.b has no comment",
        "demo/v1/bad.proto: enum Color: zero value ['RED'] is not COLOR_UNSPECIFIED",
        "demo/v1/bad.proto: enum value RED: not prefixed with COLOR_",
        "demo/v1/bad.proto: enum value COLOR_BLUE has no comment",
    ]
