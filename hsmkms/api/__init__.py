"""The HTTP-facing layer: AWS JSON 1.1 wire protocol and request authentication (SigV4 itself:
:mod:`hsmkms.sigv4`)."""
