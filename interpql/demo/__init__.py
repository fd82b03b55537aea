"""The embedded default model and how it is built (`interpql build-demo`)."""
