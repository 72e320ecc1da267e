"""The only module that imports the compiled extension; everything else uses it through here."""

from fastckpt._core import (  # noqa: F401  (re-exported)
    Archive,
    ByteView,
    Method,
    Record,
    allocate,
    check_crc,
    check_tensor_in_storage,
    crc32,
    crc32_combine,
    crc32_implementation,
    judge_crc,
    read_tree,
    replace_file,
    scan_storages,
    storage_nbytes,
    storage_reference,
    StoragePlan,
    type_dispatch,
    unpickle,
    write_zip,
)
