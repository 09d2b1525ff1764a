"""Alias and tag operations: CreateAlias, UpdateAlias, DeleteAlias, ListAliases, TagResource,
UntagResource, ListResourceTags."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

from hsmkms.errors import (
    AlreadyExistsException,
    InvalidAliasNameException,
    LimitExceededException,
    NotFoundException,
    TagException,
    ValidationException,
)
from hsmkms.models import (
    AliasListEntry,
    CreateAliasRequest,
    DeleteAliasRequest,
    EmptyResponse,
    ListAliasesRequest,
    ListAliasesResponse,
    ListResourceTagsRequest,
    ListResourceTagsResponse,
    Tag,
    TagResourceRequest,
    UntagResourceRequest,
    UpdateAliasRequest,
)
from hsmkms.policy import ContextInput
from hsmkms.service.core import Call, Prepared, ServiceCore, operation, page_limit
from hsmkms.service.identifiers import ALIAS_PREFIX, RESERVED_ALIAS_PREFIX
from hsmkms.service.states import Access
from hsmkms.store import DuplicateAlias, KeyMissing, KeyRecord, LimitReached

MAX_TAGS_PER_KEY = 50
MAX_ALIASES_PER_KEY = 50


def check_tags(tags: Sequence[Tag]) -> dict[str, str]:
    """The tags as a dict; TagException for a reserved (``aws:``) or repeated key, or too many."""
    seen: dict[str, str] = {}
    for tag in tags:
        if tag.TagKey.lower().startswith("aws:"):
            raise TagException("Tags beginning with aws: are reserved")
        if tag.TagKey in seen:
            raise TagException("Duplicate tag keys")
        seen[tag.TagKey] = tag.TagValue
    if len(seen) > MAX_TAGS_PER_KEY:
        raise TagException("Too many tags")
    return seen


def tag_conditions(tags: Mapping[str, str]) -> dict[str, ContextInput]:
    """``aws:RequestTag/<k>`` and ``aws:TagKeys`` of a request carrying tags."""
    values: dict[str, ContextInput] = {f"aws:RequestTag/{k}": v for k, v in tags.items()}
    values["aws:TagKeys"] = list(tags)
    return values


def _check_alias_name(name: str, *, creating: bool) -> None:
    if not name.startswith(ALIAS_PREFIX):
        raise ValidationException(
            'Alias must start with the prefix "alias/". Please see '
            "https://docs.aws.amazon.com/kms/latest/developerguide/kms-alias.html"
        )
    if name == ALIAS_PREFIX:
        raise InvalidAliasNameException("Alias name must not be empty after alias/.")
    if creating and name.startswith(RESERVED_ALIAS_PREFIX):
        # spec: alias/aws/ is reserved for AWS managed keys (§3.4).
        raise InvalidAliasNameException(
            f"{name} is not a valid alias name: alias/aws/ is reserved for AWS managed keys."
        )


def _prepare_create_alias(request: CreateAliasRequest) -> None:
    _check_alias_name(request.AliasName, creating=True)


def _prepare_alias(request: UpdateAliasRequest | DeleteAliasRequest) -> None:
    _check_alias_name(request.AliasName, creating=False)


def _prepare_tag_resource(request: TagResourceRequest) -> Prepared:
    return Prepared(tag_conditions(check_tags(request.Tags)))


def _prepare_untag_resource(request: UntagResourceRequest) -> Prepared:
    return Prepared({"aws:TagKeys": list(request.TagKeys)})


class AliasOperations(ServiceCore):
    """The alias and tag operations of :class:`~hsmkms.service.KmsService`."""

    def _alias_not_found(self, name: str) -> NotFoundException:
        return NotFoundException(f"Alias {self.arns.alias(name)} is not found.")

    @contextlib.contextmanager
    def _alias_write(self, key: KeyRecord) -> Iterator[None]:
        """The AWS errors of pointing an alias at ``key``: too many aliases, key gone."""
        try:
            yield
        except LimitReached:
            raise LimitExceededException(
                f"Too many aliases for {key.arn}: at most {MAX_ALIASES_PER_KEY} per key."
            ) from None
        except KeyMissing:
            raise self._not_found(key.key_id) from None

    @operation("CreateAlias", prepare=_prepare_create_alias)
    def create_alias(self, call: Call[CreateAliasRequest]) -> EmptyResponse:
        """CreateAlias: a new name for a key (at most 50 per key; ``alias/aws/`` reserved).
        The template authorized ``kms:CreateAlias`` on the key; the alias resource is
        authorized here (spec: AWS KMS — both are required)."""
        name, key = call.request.AliasName, call.key
        self._authz.check_alias(call.caller, "kms:CreateAlias", self.arns.alias(name))
        try:
            with self._alias_write(key):
                self._store.create_alias(
                    name, key.key_id, self._clock(), max_per_key=MAX_ALIASES_PER_KEY
                )
        except DuplicateAlias:
            raise AlreadyExistsException(
                f"An alias with the name {self.arns.alias(name)} already exists"
            ) from None
        return EmptyResponse()

    @operation("UpdateAlias", prepare=_prepare_alias)
    def update_alias(self, call: Call[UpdateAliasRequest]) -> EmptyResponse:
        """UpdateAlias: point an existing alias at another key of the same type and usage.
        spec: AWS KMS — kms:UpdateAlias on the alias (identity policy), on the current key and
        on the new key; the alias first, so a caller not allowed on it does not learn whether
        it exists."""
        request, caller = call.request, call.caller
        self._authz.check_alias(caller, "kms:UpdateAlias", self.arns.alias(request.AliasName))
        alias = self._store.get_alias(request.AliasName)
        if alias is None:
            raise self._alias_not_found(request.AliasName)
        old = self._store.get_key(alias.key_id)
        if old is not None and caller is not None:
            # spec: UpdateAlias needs kms:UpdateAlias on the current and on the new key (§1.4).
            caller.note_key(old.arn)
            self._authz.check_key(caller, "kms:UpdateAlias", old)
        key = self._resolve(
            request.TargetKeyId,
            aliases=False,
            access=Access.MANAGE,
            caller=caller,
            action="kms:UpdateAlias",
        )
        if old is not None and (old.key_spec, old.key_usage) != (key.key_spec, key.key_usage):
            raise ValidationException(
                "The new target key must have the same key spec and key usage as the current one."
            )
        with self._alias_write(key):
            updated = self._store.update_alias(
                request.AliasName, key.key_id, self._clock(), max_per_key=MAX_ALIASES_PER_KEY
            )
        if not updated:
            raise self._alias_not_found(request.AliasName)
        return EmptyResponse()

    @operation("DeleteAlias", prepare=_prepare_alias)
    def delete_alias(self, call: Call[DeleteAliasRequest]) -> EmptyResponse:
        """DeleteAlias: in every key state. spec: AWS KMS — kms:DeleteAlias on the alias
        (identity policy) and on its key; the alias first, as UpdateAlias."""
        name, caller = call.request.AliasName, call.caller
        self._authz.check_alias(caller, "kms:DeleteAlias", self.arns.alias(name))
        if caller is not None:
            alias = self._store.get_alias(name)
            target = self._store.get_key(alias.key_id) if alias is not None else None
            if target is not None:
                caller.note_key(target.arn)
                self._authz.check_key(caller, "kms:DeleteAlias", target)
        if not self._store.delete_alias(name):
            raise self._alias_not_found(name)
        return EmptyResponse()

    @operation("ListAliases")
    def list_aliases(self, call: Call[ListAliasesRequest]) -> ListAliasesResponse:
        """ListAliases: every alias, or those of one key; Limit 1-100 (default 50). An
        account-level action, decided by identity policies (spec: §4.2)."""
        request = call.request
        key_id = None
        if request.KeyId is not None:
            key_id = self._resolve(request.KeyId, aliases=False, access=Access.READ).key_id
        page = self._store.list_aliases(
            page_limit(request.Limit, 50), request.Marker, key_id=key_id
        )
        return ListAliasesResponse(
            Aliases=[
                AliasListEntry(
                    AliasName=a.name,
                    AliasArn=self.arns.alias(a.name),
                    TargetKeyId=a.key_id,
                    CreationDate=a.created_at,
                    LastUpdatedDate=a.updated_at,
                )
                for a in page.items
            ],
            NextMarker=page.next_marker,
            Truncated=page.truncated,
        )

    @operation("TagResource", prepare=_prepare_tag_resource)
    def tag_resource(self, call: Call[TagResourceRequest]) -> EmptyResponse:
        """TagResource: add or overwrite tags (at most 50 per key; ``aws:`` reserved)."""
        key = call.key
        try:
            self._store.put_tags(
                key.key_id, check_tags(call.request.Tags), max_tags=MAX_TAGS_PER_KEY
            )
        except LimitReached:
            raise TagException("Too many tags") from None
        except KeyMissing:
            raise self._not_found(key.key_id) from None
        return EmptyResponse()

    @operation("UntagResource", prepare=_prepare_untag_resource)
    def untag_resource(self, call: Call[UntagResourceRequest]) -> EmptyResponse:
        """UntagResource: remove tags; absent tag keys are ignored."""
        tag_keys = call.request.TagKeys
        for tag_key in tag_keys:
            if tag_key.lower().startswith("aws:"):
                raise TagException("Tags beginning with aws: are reserved")
        self._store.remove_tags(call.key.key_id, tag_keys)
        return EmptyResponse()

    @operation("ListResourceTags")
    def list_resource_tags(self, call: Call[ListResourceTagsRequest]) -> ListResourceTagsResponse:
        """ListResourceTags: Limit 1-50 (default 50), sorted by tag key."""
        request = call.request
        page = self._store.list_tags(call.key.key_id, page_limit(request.Limit, 50), request.Marker)
        return ListResourceTagsResponse(
            Tags=[Tag(TagKey=k, TagValue=v) for k, v in page.items],
            NextMarker=page.next_marker,
            Truncated=page.truncated,
        )
