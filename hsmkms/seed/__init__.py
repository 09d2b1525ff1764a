"""Seed files: the custom key stores, keys, aliases and credentials a data directory must hold,
declared in YAML and applied idempotently (``hsmkms serve --seed FILE``, ``HSMKMS_SEED``,
``hsmkms seed``).

* :mod:`hsmkms.seed.document` — the schema and reading it (:func:`load_seed`), with every
  check that needs no data directory;
* :mod:`hsmkms.seed.plan` — :func:`plan_seed` (checked against a data directory, nothing
  changed) and :func:`apply_seed` (the plan's steps, as the local operator);
* :mod:`hsmkms.seed.export` — :func:`export_seed`, a data directory's definitions as a seed
  file, never a secret.

It sits beside the command line, above the composition root (:mod:`hsmkms.system`) whose
``System`` it is handed; ``docs/seed-file.md`` is the user's view.
"""

from __future__ import annotations

from hsmkms.seed.document import SeedDocument, SeedError, load_seed, parse_seed
from hsmkms.seed.export import export_seed
from hsmkms.seed.plan import SeedPlan, SeedReport, apply_seed, plan_seed

__all__ = [
    "SeedDocument",
    "SeedError",
    "SeedPlan",
    "SeedReport",
    "apply_seed",
    "export_seed",
    "load_seed",
    "parse_seed",
    "plan_seed",
]
