"""embedding-proxy: an OpenAI-compatible embeddings gateway."""

__version__ = "0.1.0"
