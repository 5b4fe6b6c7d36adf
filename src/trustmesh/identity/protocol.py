"""Wire messages of the CA API, built at import from descriptors (no generated code).

``istio.v1.auth.IstioCertificateService/CreateCertificate`` is wire-compatible with
Istio's (istio/api security/v1alpha1/ca.proto): an istio-agent could talk to it.
``trustmesh.ca.v1.TrustBundleService/GetTrustBundle`` hands out the current roots (more
than one during a root rotation), which Istio distributes through a ConfigMap instead.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
GET_TRUST_BUNDLE = "/trustmesh.ca.v1.TrustBundleService/GetTrustBundle"

_F = descriptor_pb2.FieldDescriptorProto


def _file(
    name: str,
    package: str,
    messages: list[tuple[str, list[tuple[str, int, int, int, str]]]],
    deps: list[str],
) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto3")
    proto.dependency.extend(deps)
    for message_name, fields in messages:
        message = proto.message_type.add(name=message_name)
        for field_name, number, kind, label, type_name in fields:
            field = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name
    return proto


def _build() -> dict[str, Any]:
    pool = descriptor_pool.Default()
    # the Struct descriptor must be in the pool before a file that depends on it
    assert struct_pb2.Struct.DESCRIPTOR.full_name == "google.protobuf.Struct"
    files = [
        _file(
            "trustmesh/istio_ca.proto",
            "istio.v1.auth",
            [
                (
                    "IstioCertificateRequest",
                    [
                        ("csr", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
                        ("validity_duration", 3, _F.TYPE_INT64, _F.LABEL_OPTIONAL, ""),
                        (
                            "metadata",
                            4,
                            _F.TYPE_MESSAGE,
                            _F.LABEL_OPTIONAL,
                            ".google.protobuf.Struct",
                        ),
                    ],
                ),
                (
                    "IstioCertificateResponse",
                    [
                        ("cert_chain", 1, _F.TYPE_STRING, _F.LABEL_REPEATED, ""),
                    ],
                ),
            ],
            ["google/protobuf/struct.proto"],
        ),
        _file(
            "trustmesh/trust_bundle.proto",
            "trustmesh.ca.v1",
            [
                ("TrustBundleRequest", []),
                ("TrustBundleResponse", [("roots", 1, _F.TYPE_STRING, _F.LABEL_REPEATED, "")]),
            ],
            [],
        ),
    ]
    classes: dict[str, Any] = {}
    for proto in files:
        try:
            descriptor = pool.FindFileByName(proto.name)
        except KeyError:
            pool.Add(proto)
            descriptor = pool.FindFileByName(proto.name)
        for name in descriptor.message_types_by_name:
            full = f"{proto.package}.{name}"
            classes[name] = message_factory.GetMessageClass(pool.FindMessageTypeByName(full))
    return classes


_CLASSES = _build()
CertificateRequest: Any = _CLASSES["IstioCertificateRequest"]
CertificateResponse: Any = _CLASSES["IstioCertificateResponse"]
TrustBundleRequest: Any = _CLASSES["TrustBundleRequest"]
TrustBundleResponse: Any = _CLASSES["TrustBundleResponse"]
