"""The bottom layer: the config, errors, redaction, escaping, table schemas, process facts. Imports nothing of shapline outside this package."""
