"""The only module that imports the compiled extension; everything else uses it through here."""

from fastckpt._core import (  # noqa: F401  (re-exported)
    Archive,
    ByteView,
    allocate,
    crc32,
    crc32_combine,
    crc32_implementation,
    persistent_id_filter,
    replace_file,
    unpickle,
    write_zip,
)
