"""The HTTP-facing layer: AWS JSON 1.1 wire protocol and SigV4 request authentication."""
