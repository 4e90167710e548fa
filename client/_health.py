"""The two ``grpc.health.v1`` messages, built at import time without ``grpcio-health-checking``.

The messages are defined from a ``FileDescriptorProto`` in a private descriptor pool, so they
never clash with ``grpc_health`` when the server's package is loaded in the same process.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

from .types import HealthStatus

__all__ = ["CHECK_METHOD", "HealthCheckRequest", "HealthCheckResponse", "health_status"]

CHECK_METHOD = "/grpc.health.v1.Health/Check"


def _build() -> tuple[type[message.Message], type[message.Message]]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="retd_client/grpc/health/v1/health.proto",
        package="grpc.health.v1",
        syntax="proto3",
    )
    request = fdp.message_type.add(name="HealthCheckRequest")
    request.field.add(
        name="service",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    response = fdp.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
        ),
    )


HealthCheckRequest, HealthCheckResponse = _build()

_STATUS = list(HealthStatus)


def health_status(response: object) -> HealthStatus:
    """The ``status`` field of a ``HealthCheckResponse`` as a :class:`HealthStatus`."""
    number = int(getattr(response, "status", 0))
    return _STATUS[number] if 0 <= number < len(_STATUS) else HealthStatus.UNKNOWN
