"""The quality benchmark of align-decode: `python -m benchmarks.quality.run --full | --smoke`."""
