"""Pixels in, boxes out, on the CPU: decoding, resizing, the graph's normalisation, postprocessing.
Knows no Redis, no asyncio."""
