"""The gRPC server: ``app`` (construction, health, shutdown, logs), ``servicers`` (thin, over the
domain layer), ``errors`` (the one exception → status table), ``convert`` (protos ↔ domain),
``limits`` (per-request caps)."""
