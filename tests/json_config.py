"""A config file for tests that start the real command line: `--config=tests/json_config.py:/path/config.json`
loads a run config saved with `ConfigDict.to_json()`."""

import json

from ml_collections import ConfigDict


def get_config(path):
    with open(path) as f:
        return ConfigDict(json.load(f))
