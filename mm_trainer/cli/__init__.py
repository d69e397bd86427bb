"""The `mm-trainer` command line: `plan`, `audit` and `compare`."""
