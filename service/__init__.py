"""rulewright's server side: ``engine`` (pure PyTorch math) and ``importers`` (model sources)."""
