"""Thin functions from GraphQL arguments to loaders and backends; no torch here."""
