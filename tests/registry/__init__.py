"""Registry tests: blob stores (filesystem and S3 on moto_server), versions, aliases, the statistics cache."""
