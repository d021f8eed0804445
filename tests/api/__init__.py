"""API contract tests: the generated stubs, real gRPC round trips through in-test servicers, buf lint, and the Open Inference Protocol against tritonclient."""
