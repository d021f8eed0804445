"""The pure-PyTorch engine: no gRPC, no storage, no network.

- ``generators``: ``Generator`` (base), ``DCGANGenerator``, ``ProGANGenerator``, ``StyleGAN2Generator``.
- ``loading``: ``load_generator(path | bytes | dict)`` from safetensors or weights-only checkpoints.
- ``sampling``: ``latents(seeds)``, ``sample(model, seeds)``, ``to_uint8``, ``grid``.
- ``nethook``: ``Trace`` and the three parts of an edit (latents → keys, keys → values, values → image).
- ``stats``: ``SecondMoment``, ``Quantile``, ``key_moment``, ``value_quantiles``.
- ``device``: ``select_device``, ``configure_determinism``, ``CPU_GPU_TOLERANCE``.
"""
