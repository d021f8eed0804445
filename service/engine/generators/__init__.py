"""Generator architectures in their public checkpoint layouts (see ``base`` for the contract)."""
