"""bigadapt: parameter-efficient adaptation of very large language models on a ZeRO-3-sharded frozen base."""

__version__ = "0.1.0"
