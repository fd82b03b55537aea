"""Per-request loaders and the data sources behind them."""
