"""Tag operations: TagResource, UntagResource, ListResourceTags."""

from __future__ import annotations

from typing import Annotated

from hsmkms.models.base import KeyIdType, KmsModel, MarkerType
from hsmkms.models.constraints import Length, Range


class Tag(KmsModel):
    TagKey: Annotated[str, Length(1, 128)]
    TagValue: Annotated[str, Length(0, 256)]


class TagResourceRequest(KmsModel):
    KeyId: KeyIdType
    Tags: list[Tag]


class UntagResourceRequest(KmsModel):
    KeyId: KeyIdType
    TagKeys: list[Annotated[str, Length(1, 128)]]


class ListResourceTagsRequest(KmsModel):
    KeyId: KeyIdType
    Limit: Annotated[int | None, Range(1, 50)] = None
    Marker: MarkerType | None = None


class ListResourceTagsResponse(KmsModel):
    Tags: list[Tag]
    NextMarker: str | None = None
    Truncated: bool
