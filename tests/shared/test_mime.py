from __future__ import annotations

import pytest

from clip_shared.mime import SNIFF_BYTES, is_accepted, sniff_mime
from tests.support import all_formats, encode, photo


@pytest.mark.parametrize("name", sorted(all_formats(photo())))
def test_real_files_of_every_accepted_format_are_recognised_from_their_bytes(name: str) -> None:
    data, mime, _ = all_formats(photo())[name]
    assert sniff_mime(data[:SNIFF_BYTES]) == mime
    assert is_accepted(mime)


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (b"%PDF-1.7\n", "application/pdf"),
        (b"\n\nplain text that starts with newlines", None),
        (b"", None),
        (encode(photo().resize((32, 32)), "ICO"), "image/x-icon"),
    ],
)
def test_other_files_are_not_accepted_whatever_their_name(data: bytes, mime: str | None) -> None:
    assert sniff_mime(data[:SNIFF_BYTES]) == mime
    assert not is_accepted(mime)
