"""The domain: what every transport calls, over the engine (math) and the registry (storage).

- ``core.Domain``: resolves references, keeps versions resident and runs samples, rewrites,
  dissections, searches and statistics; ``catalog.Catalog`` (its base): the registry's listings,
  lookups and deletions.
- ``requests``: the typed requests and results every transport builds and renders, and the
  engine's value types a transport may name (regions, interventions, progress events).
- Its parts: ``residency`` (versions kept in memory as low-rank terms over a shared base),
  ``batching`` (Sample calls coalesced into one forward pass), ``limits`` (the bounds every request
  is checked against before expensive work), ``statistics`` (layer statistics: cache, store, compute),
  ``weights`` (a version's weights materialized and exported).
"""
