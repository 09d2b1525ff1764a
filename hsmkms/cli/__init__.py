"""The ``hsmkms`` command."""
