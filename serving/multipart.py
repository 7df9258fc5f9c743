"""multipart/form-data bodies (RFC 7578), as `requests.post(url, files=...)` and `curl -F` send them:

    --BOUNDARY\r\n
    Content-Disposition: form-data; name="parameters"\r\n
    \r\n
    {"top_k": 3}\r\n
    --BOUNDARY\r\n
    Content-Disposition: form-data; name="image"; filename="face.jpg"\r\n
    Content-Type: image/jpeg\r\n
    \r\n
    <the file's bytes>\r\n
    --BOUNDARY--\r\n

The body is split on "\r\n--BOUNDARY" here, so every part's bytes come back exactly as sent (RFC 2046
5.1.1: the CRLF before a delimiter belongs to the delimiter). Each part's few header lines are read by
the email package, which knows the quoting rules (filename="a \"b\".jpg", RFC 2231's filename*=).
Nothing here knows about HTTP: a malformed body raises MultipartError, whose message says what is wrong.
"""
from __future__ import annotations

import email.message
import email.parser
import email.policy
from dataclasses import dataclass

MAX_BOUNDARY = 70   # RFC 2046 5.1.1: a boundary is 1 to 70 characters


class MultipartError(ValueError):
    """A multipart/form-data body that does not parse; the message says where."""


@dataclass
class Part:
    name: str                 # the form field's name
    filename: str | None      # set (maybe "") for a file part, None for a plain field
    content_type: str | None  # the part's own Content-Type header, if any
    data: bytes


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a `multipart/form-data; boundary=...` Content-Type header."""
    header = email.message.Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise MultipartError("the Content-Type header has no boundary parameter "
                             "(multipart/form-data; boundary=...)")
    if len(boundary) > MAX_BOUNDARY or not boundary.isascii():
        raise MultipartError(f"boundary {boundary[:80]!r} is not 1 to {MAX_BOUNDARY} ASCII characters")
    return boundary.encode("ascii")


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """A multipart/form-data body -> its parts, in order. The preamble before the first boundary and
    the epilogue after the last are ignored, as RFC 2046 says."""
    delimiter = b"--" + boundary_of(content_type)
    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        first = body.find(b"\r\n" + delimiter)
        if first < 0:
            raise MultipartError(f"the boundary {delimiter[2:].decode()!r} of the Content-Type header does not "
                                 "occur in the body")
        position = first + 2 + len(delimiter)
    parts = []
    while not body.startswith(b"--", position):         # "--BOUNDARY--" closes the body
        line_end = body.find(b"\r\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):   # only transport padding may follow
            raise MultipartError(f"boundary {len(parts) + 1} is not followed by a line break (CRLF)")
        start = line_end + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise MultipartError(f"part {len(parts) + 1} is not ended by a boundary line: the body is cut short "
                                 "or lacks its closing --BOUNDARY--")
        parts.append(parse_part(body[start:end], number=len(parts) + 1))
        position = end + 2 + len(delimiter)
    if not parts:
        raise MultipartError("the body has no parts")
    return parts


def parse_part(raw: bytes, *, number: int) -> Part:
    """One part: header lines, a blank line, the data."""
    if raw.startswith(b"\r\n"):                         # no header lines at all
        head, data = b"", raw[2:]
    else:
        head, blank, data = raw.partition(b"\r\n\r\n")
        if not blank:
            raise MultipartError(f"part {number} has no blank line after its header lines")
    headers = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(head + b"\r\n\r\n")
    if headers.get_content_disposition() != "form-data":
        raise MultipartError(f"part {number} has no 'Content-Disposition: form-data' header")
    name = headers.get_param("name", header="content-disposition")
    if not isinstance(name, str) or not name:
        raise MultipartError(f"part {number}'s Content-Disposition has no name")
    return Part(name=name, filename=headers.get_filename(), content_type=headers.get("Content-Type"), data=data)
