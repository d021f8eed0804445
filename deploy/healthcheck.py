"""The image's HEALTHCHECK: exit 0 when this container's server answers grpc.health.v1 SERVING.

It asks the port of ``RULEWRIGHT_ADDRESS`` (the same setting the server listens on) on
127.0.0.1, in plaintext, like Kubernetes' native gRPC probes; with TLS on, probe through a
mesh or an exec probe with client certificates instead. Exit 1: not serving or no answer.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    address = os.environ.get("RULEWRIGHT_ADDRESS") or "127.0.0.1:50051"
    port = address.rpartition(":")[2]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=4).status
    except grpc.RpcError as exc:
        print(f"health check failed: {exc.code().name}", file=sys.stderr)
        return 1
    if status != health_pb2.HealthCheckResponse.SERVING:
        print(f"health: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
