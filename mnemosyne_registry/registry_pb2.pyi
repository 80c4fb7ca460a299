# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Lineage(_message.Message):
    __slots__ = ("parent_version", "run_id", "generation", "config_json", "task_family_fingerprint", "eval_metrics", "code_version", "jax_version")
    class EvalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TASK_FAMILY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EVAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    CODE_VERSION_FIELD_NUMBER: _ClassVar[int]
    JAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    parent_version: int
    run_id: str
    generation: int
    config_json: str
    task_family_fingerprint: str
    eval_metrics: _containers.ScalarMap[str, float]
    code_version: str
    jax_version: str
    def __init__(self, parent_version: _Optional[int] = ..., run_id: _Optional[str] = ..., generation: _Optional[int] = ..., config_json: _Optional[str] = ..., task_family_fingerprint: _Optional[str] = ..., eval_metrics: _Optional[_Mapping[str, float]] = ..., code_version: _Optional[str] = ..., jax_version: _Optional[str] = ...) -> None: ...

class Compatibility(_message.Message):
    __slots__ = ("architecture_spec_json", "theta_fingerprint", "required_extra_args", "format")
    ARCHITECTURE_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    THETA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_EXTRA_ARGS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    architecture_spec_json: str
    theta_fingerprint: str
    required_extra_args: _containers.RepeatedScalarFieldContainer[str]
    format: str
    def __init__(self, architecture_spec_json: _Optional[str] = ..., theta_fingerprint: _Optional[str] = ..., required_extra_args: _Optional[_Iterable[str]] = ..., format: _Optional[str] = ...) -> None: ...

class VersionMetadata(_message.Message):
    __slots__ = ("lineage", "compatibility", "tags", "description")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    COMPATIBILITY_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    lineage: Lineage
    compatibility: Compatibility
    tags: _containers.ScalarMap[str, str]
    description: str
    def __init__(self, lineage: _Optional[_Union[Lineage, _Mapping]] = ..., compatibility: _Optional[_Union[Compatibility, _Mapping]] = ..., tags: _Optional[_Mapping[str, str]] = ..., description: _Optional[str] = ...) -> None: ...

class Version(_message.Message):
    __slots__ = ("name", "number", "sha256", "size", "created_unix_ms", "metadata", "aliases")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    name: str
    number: int
    sha256: str
    size: int
    created_unix_ms: int
    metadata: VersionMetadata
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., number: _Optional[int] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., metadata: _Optional[_Union[VersionMetadata, _Mapping]] = ..., aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class VersionRef(_message.Message):
    __slots__ = ("name", "number", "alias")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    number: int
    alias: str
    def __init__(self, name: _Optional[str] = ..., number: _Optional[int] = ..., alias: _Optional[str] = ...) -> None: ...

class PublishHeader(_message.Message):
    __slots__ = ("name", "metadata", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    metadata: VersionMetadata
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., metadata: _Optional[_Union[VersionMetadata, _Mapping]] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PublishHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PublishHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: Version
    def __init__(self, version: _Optional[_Union[Version, _Mapping]] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: VersionRef
    def __init__(self, ref: _Optional[_Union[VersionRef, _Mapping]] = ...) -> None: ...

class Optimizer(_message.Message):
    __slots__ = ("name", "latest_version", "aliases", "updated_unix_ms")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    latest_version: int
    aliases: _containers.ScalarMap[str, int]
    updated_unix_ms: int
    def __init__(self, name: _Optional[str] = ..., latest_version: _Optional[int] = ..., aliases: _Optional[_Mapping[str, int]] = ..., updated_unix_ms: _Optional[int] = ...) -> None: ...

class ListOptimizersRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "name_prefix")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    name_prefix: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., name_prefix: _Optional[str] = ...) -> None: ...

class ListOptimizersResponse(_message.Message):
    __slots__ = ("optimizers", "next_page_token")
    OPTIMIZERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    optimizers: _containers.RepeatedCompositeFieldContainer[Optimizer]
    next_page_token: str
    def __init__(self, optimizers: _Optional[_Iterable[_Union[Optimizer, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("name", "page_size", "page_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    page_size: int
    page_token: str
    def __init__(self, name: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions", "next_page_token")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[Version]
    next_page_token: str
    def __init__(self, versions: _Optional[_Iterable[_Union[Version, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("ref", "offset", "chunk_size")
    REF_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ref: VersionRef
    offset: int
    chunk_size: int
    def __init__(self, ref: _Optional[_Union[VersionRef, _Mapping]] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("version", "chunk")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    version: Version
    chunk: bytes
    def __init__(self, version: _Optional[_Union[Version, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("name", "alias", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    version: int
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Alias(_message.Message):
    __slots__ = ("name", "alias", "version", "updated_unix_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    version: int
    updated_unix_ms: int
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ...) -> None: ...

class DeleteAliasRequest(_message.Message):
    __slots__ = ("name", "alias")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ...) -> None: ...

class DeleteAliasResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchAliasRequest(_message.Message):
    __slots__ = ("name", "alias", "after_sequence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    after_sequence: int
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class AliasEvent(_message.Message):
    __slots__ = ("name", "alias", "version", "deleted", "sequence", "unix_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    version: int
    deleted: bool
    sequence: int
    unix_ms: int
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[int] = ..., deleted: _Optional[bool] = ..., sequence: _Optional[int] = ..., unix_ms: _Optional[int] = ...) -> None: ...
