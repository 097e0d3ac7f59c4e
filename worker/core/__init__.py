"""The bottom layer: errors, settings, the wire protocol, model specs, logging, metrics.
Imports nothing else of the worker."""
