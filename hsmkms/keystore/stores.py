"""The registry of key stores: store id -> the :class:`~hsmkms.keystore.base.Keystore` holding
that store's key material.

The default store (id ``default``) is the configured token; it is where new keys are created.
Custom key stores (further tokens, external key managers) are registered under their own ids
by the composition root from the operator's configuration, never by an API caller; those that
come and go while the process runs (AWS_CLOUDHSM custom key stores, connected and disconnected
through the API) are found through a ``resolve`` callable the service gives
(:meth:`KeyStores.with_resolver`). A key material reference names its store
(:attr:`KeyMaterialRef.store`), and :meth:`backend_for` picks the store that holds it.

Pure: no ``pkcs11`` here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from hsmkms.keystore.base import DEFAULT_STORE, KeyMaterialRef, Keystore
from hsmkms.keystore.errors import UnknownKeyStore

__all__ = ["KeyStores", "key_stores"]


class KeyStores:
    """Key stores by id; the default store always present. Immutable; thread-safe."""

    def __init__(
        self,
        default: Keystore,
        others: Mapping[str, Keystore] | None = None,
        *,
        resolve: Callable[[str], Keystore] | None = None,
    ) -> None:
        self._default = default
        self._resolve = resolve
        self._stores: dict[str, Keystore] = {DEFAULT_STORE: default}
        for store_id, store in (others or {}).items():
            if store_id in self._stores:
                raise ValueError(f"key store {store_id!r} registered twice")
            # The id must be one a reference can carry.
            KeyMaterialRef.check_store_id(store_id)
            self._stores[store_id] = store

    def __repr__(self) -> str:
        return f"KeyStores({sorted(self._stores)})"

    def with_resolver(self, resolve: Callable[[str], Keystore]) -> KeyStores:
        """The same stores, and ``resolve(store_id)`` for an id none of them has (it returns
        the store or raises the caller's error: a custom key store not connected)."""
        others = {k: v for k, v in self._stores.items() if k != DEFAULT_STORE}
        return KeyStores(self._default, others, resolve=resolve)

    @property
    def default(self) -> Keystore:
        """The default store: the configured token, where new keys are created."""
        return self._default

    def get(self, store_id: str) -> Keystore:
        """The store ``store_id``; :class:`UnknownKeyStore` when none is registered."""
        store = self._stores.get(store_id)
        if store is None:
            if self._resolve is not None:
                return self._resolve(store_id)
            raise UnknownKeyStore(f"no key store {store_id!r} is registered")
        return store

    def backend_for(self, ref: KeyMaterialRef) -> Keystore:
        """The store holding the material ``ref`` names; :class:`UnknownKeyStore` when its
        store is not registered."""
        store = self._stores.get(ref.store)
        if store is None:
            if self._resolve is not None:
                return self._resolve(ref.store)
            raise UnknownKeyStore(f"no key store {ref.store!r} is registered")
        return store

    def items(self) -> Iterator[tuple[str, Keystore]]:
        """``(store id, store)`` pairs, the default store first."""
        return iter(self._stores.items())

    def __contains__(self, store_id: object) -> bool:
        return store_id in self._stores

    def __len__(self) -> int:
        return len(self._stores)

    def close(self) -> None:
        """Close every store (end of process); every store is closed even when one fails."""
        errors: list[BaseException] = []
        for store in reversed(list(self._stores.values())):
            try:
                store.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def key_stores(keystore: Keystore | KeyStores) -> KeyStores:
    """``keystore`` as a registry: a registry as it is, a single store as the default store."""
    return keystore if isinstance(keystore, KeyStores) else KeyStores(keystore)
