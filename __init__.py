"""stalwart: a fault-tolerant distributed training runtime for Llama-style LLMs."""

__version__ = "0.1.0"
