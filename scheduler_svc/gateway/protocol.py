"""gRPC plumbing around the gateway's servicer: request decoding that names what is wrong with a corrupt
message, server reflection under both package names (v1 and v1alpha), and health with List.

- A message that does not parse reaches the servicer as a ``BadMessage`` and is refused with
  INVALID_ARGUMENT naming the first string field that is not UTF-8 (``text: is not valid UTF-8``), or
  the message as corrupt; grpc's own handling would answer UNKNOWN with a Python exception's name.
- grpcio-reflection serves only ``grpc.reflection.v1alpha``. ``grpc.reflection.v1`` is the same
  protocol under another package (same messages, same field numbers), so its method is served by the
  same implementation; its file descriptor (v1alpha's, renamed) joins the default pool so that a v1
  client can ask for it by symbol like any other.
- grpcio-health-checking's servicer leaves ``Health/List`` unimplemented; it lists what ``set`` set.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor, ServiceDescriptor
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA_SERVICE = "grpc.reflection.v1alpha.ServerReflection"


# ---- requests that do not parse


@dataclass(frozen=True, slots=True)
class BadMessage:
    """What the decoder hands the servicer instead of a request that did not parse."""

    message: str
    field: str = ""  # the first string field that is not valid UTF-8, when that is the cause


Reject = Callable[[BadMessage, grpc.aio.ServicerContext], Awaitable[None]]


def tolerant_handler(servicer: object, service: ServiceDescriptor, messages: object,
                     reject: Reject) -> grpc.GenericRpcHandler:
    """The service's method handlers (unary requests, as GenerationService's are) whose decoders
    turn a parse failure into a BadMessage, which ``reject`` answers before the servicer sees it.
    ``messages``: the generated module holding the request and response classes."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streaming is not supported here")
        request_cls = getattr(messages, method.input_type.name)
        response_cls = getattr(messages, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            _refusing(getattr(servicer, method.name), reject),
            request_deserializer=_decoder(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _decoder(request_cls) -> Callable[[bytes], object]:
    def decode(data: bytes):
        try:
            return request_cls.FromString(data)
        except Exception:  # DecodeError, and whatever else a hostile message finds
            return diagnose(data, request_cls.DESCRIPTOR)

    return decode


def _refusing(method, reject: Reject):
    async def call(request, context):
        if isinstance(request, BadMessage):
            await reject(request, context)
            return None
        return await method(request, context)

    return call


def diagnose(data: bytes, descriptor: Descriptor) -> BadMessage:
    """Why ``data`` is not a valid ``descriptor`` message: a string field that is not UTF-8 (named by
    its path), or a corrupt encoding."""
    try:
        field_path = _first_non_utf8(data, descriptor, "")
    except ValueError:
        field_path = None
    if field_path is not None:
        return BadMessage(f"{field_path}: is not valid UTF-8", field_path)
    return BadMessage(f"the request is not a valid {descriptor.full_name} message (corrupt or truncated encoding)")


def _first_non_utf8(data: bytes, descriptor: Descriptor, prefix: str) -> str | None:
    """Walks the wire format; raises ValueError where the encoding itself is broken."""
    for number, value in _length_delimited(data):
        field = descriptor.fields_by_number.get(number)
        if field is None:
            continue
        path = prefix + field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return path
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            found = _first_non_utf8(value, field.message_type, path + ".")
            if found is not None:
                return found
    return None


def _length_delimited(data: bytes):
    """(field number, bytes) of every length-delimited field at this level; ValueError when corrupt."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            size, pos = _varint(data, pos)
            if pos + size > end:
                raise ValueError("truncated")
            yield number, data[pos : pos + size]
            pos += size
        else:
            raise ValueError(f"wire type {wire_type}")
        if pos > end:
            raise ValueError("truncated")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


# ---- server reflection, v1 and v1alpha


def reflection_v1_file() -> FileDescriptor:
    """grpc.reflection.v1's file descriptor in the default pool (added once, from v1alpha's)."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(REFLECTION_V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name, proto.package = REFLECTION_V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")  # v1alpha's say deprecated, and name v1alpha's Java and Go packages
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:  # assigning even "" would mark a scalar field as naming a type
                field.type_name = field.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    pool.AddSerializedFile(proto.SerializeToString())
    return pool.FindFileByName(REFLECTION_V1_FILE)


def enable_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Serves reflection as both grpc.reflection.v1 and v1alpha, listing ``service_names`` and both."""
    reflection_v1_file()
    names = (*service_names, REFLECTION_V1_SERVICE, REFLECTION_V1ALPHA_SERVICE)
    servicer = ReflectionServicer(names)
    for service in (REFLECTION_V1_SERVICE, REFLECTION_V1ALPHA_SERVICE):
        # The same messages on the wire: v1alpha's classes decode and encode both.
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            service, {"ServerReflectionInfo": handler}),))


# ---- health


class HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 with List: every service whose status was set, and the status."""

    async def List(self, request, context) -> health_pb2.HealthListResponse:
        statuses = dict(self._server_status)  # the base class's record of set(); a snapshot, as List promises
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()})
