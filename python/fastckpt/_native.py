"""The only module that imports the compiled extension; everything else uses it through here."""

from fastckpt._core import (  # noqa: F401  (re-exported)
    Archive,
    ByteView,
    Method,
    Record,
    allocate,
    check_tensor_in_storage,
    copy_memory,
    crc32,
    crc32_combine,
    crc32_implementation,
    judge_crc,
    read_tree,
    replace_file,
    scan_storages,
    StoragePlan,
    type_dispatch,
    unpickle,
    write_pieces,
    write_zip,
    zip_data_offsets,
)
