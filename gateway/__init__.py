"""The HTTP side: a Litestar app with one module per API dialect. Never imports torch."""
