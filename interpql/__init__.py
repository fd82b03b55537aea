"""interpql: a GraphQL API server for the interpretability of transformer language models."""

__version__ = "0.1.0"
