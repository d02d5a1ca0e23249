"""Run configurations: small Python files whose `get_config()` returns an ml_collections ConfigDict."""
