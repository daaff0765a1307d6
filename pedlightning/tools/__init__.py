"""Command-line tools that are not Lightning runs: ``pedlightning make-shards`` and ``pedlightning export-encoder``."""
