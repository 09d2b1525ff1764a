"""The read-only web console: its pages (:mod:`.pages`) and sessions (:mod:`.sessions`); the
HTTP side is :mod:`hsmkms.api.console`."""
