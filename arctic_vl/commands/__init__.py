"""CLI commands that rebuild a run (export, inspect-data): above the engine in the layers."""
