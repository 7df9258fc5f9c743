"""A POST body: how it is read (its Content-Length checked, then exactly that many bytes), and what it
may hold with its parameters: the raw image bytes, JSON in the Hugging Face Inference API's format, or
a multipart/form-data upload. Every body that does not fit raises HTTPError with its status and a
message for the client. Nothing here needs a socket: headers are a parsed message, the body a stream.

    raw           the image bytes (any Content-Type but the two below)
    JSON          {"inputs": "<base64 image>", "parameters": {...}}; told by its Content-Type
                  (application/json) or by its first byte ("{" begins no image format)
    multipart     multipart/form-data with the image in its one file part (any field name) and, if
                  present, a "parameters" field holding the same JSON object as above

Used by serve_emotion.py.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from email.message import Message
from typing import BinaryIO, Callable

from serving.multipart import MultipartError, parse_multipart
from vit.classifier import FUNCTIONS


class HTTPError(Exception):
    """A request we refuse: the status and the message sent back as {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---- reading the body: its announced length, then exactly that many bytes ----------------------------
def content_length(headers: Message, *, max_bytes: int) -> int:
    """The body's length from the request's headers (http.server's parsed message), refused before a
    byte of the body is read: chunked (411), no Content-Length (411), two that disagree or one that
    is not a number (400), over `max_bytes` (413), or zero (400)."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        raise HTTPError(411, "chunked bodies are not supported: send a Content-Length")
    values = set(headers.get_all("Content-Length") or [])
    if not values:
        raise HTTPError(411, "a Content-Length header is required")
    if len(values) > 1:
        raise HTTPError(400, f"conflicting Content-Length headers: {', '.join(sorted(values))}")
    raw = values.pop()
    if not raw.strip().isdigit():
        raise HTTPError(400, f"Content-Length {raw!r} is not a number of bytes")
    length = int(raw)
    if length > max_bytes:
        raise HTTPError(413, f"body of {length} bytes is over the limit of {max_bytes} bytes (--max_body_mb)")
    if length == 0:
        raise HTTPError(400, "empty body: send the image bytes, or JSON with \"inputs\"")
    return length


def read_body(stream: BinaryIO, length: int, *, timeout_s: float) -> bytes:
    """Exactly `length` bytes from `stream` (a buffered reader, read in chunks of up to 64 KiB). The
    caller bounds the whole body in time: the stream raises TimeoutError once `timeout_s` has passed
    (serving/connections.py's DeadlineReader), which is a 408 naming how much came; a body shorter
    than announced is a 400."""
    chunks, received = [], 0
    while received < length:
        try:
            chunk = stream.read1(min(length - received, 1 << 16))
        except TimeoutError:
            raise HTTPError(408, f"body not received within {timeout_s:g} s ({received} of {length} bytes); "
                                 "check the Content-Length") from None
        if not chunk:
            raise HTTPError(400, f"body ended after {received} of the {length} bytes its Content-Length announced")
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


# ---- the request's parameters: one row per name -----------------------------------------------------
@dataclass(frozen=True)
class Parameter:
    default: object
    valid: Callable[[object], bool]
    expected: str                      # said in the 400 answer when `valid` refuses a value


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# The Inference API's image-classification parameters. A new option is one more row here.
PARAMETERS = {
    "top_k": Parameter(5, _positive_int, "an integer >= 1 (capped at the number of labels)"),
    "function_to_apply": Parameter("softmax", lambda v: v in FUNCTIONS, f"one of {', '.join(FUNCTIONS)}"),
    "faces": Parameter(False, lambda v: isinstance(v, bool), "true or false (classify each face crop)"),
}
TOP_LEVEL_KEYS = ("inputs", "parameters", "options")  # "options" (wait_for_model, use_cache): ignored here
FORM_FIELDS = ("parameters",)                         # multipart's plain fields, beside the file part


def parse_parameters(given) -> dict:
    """The request's "parameters" object -> every parameter's value, defaults filled in."""
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise HTTPError(400, f'"parameters" must be a JSON object, not {type(given).__name__}')
    unknown = sorted(set(given) - set(PARAMETERS))
    if unknown:
        raise HTTPError(400, f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(PARAMETERS)}")
    values = {}
    for name, parameter in PARAMETERS.items():
        value = given.get(name, parameter.default)
        if not parameter.valid(value):
            raise HTTPError(400, f"parameters.{name} = {json.dumps(value)}: must be {parameter.expected}")
        values[name] = value
    return values


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON value")


def read_json(data: bytes, what: str):
    """Strict JSON: NaN and Infinity (which Python's parser accepts) are refused, and so is nesting too
    deep for the parser (a RecursionError, which would otherwise be a 500), each as 400."""
    try:
        return json.loads(data, parse_constant=_no_constants)
    except RecursionError:
        raise HTTPError(400, f"{what} is not valid JSON here: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:      # json.JSONDecodeError is a ValueError
        raise HTTPError(400, f"{what} is not valid JSON ({e})") from e


def parse_body(body: bytes, content_type: str) -> tuple[bytes, dict]:
    """A raw-image, JSON or multipart body -> (image bytes, parameters)."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return parse_form(body, content_type)
    if media_type != "application/json" and body.lstrip()[:1] != b"{":
        return body, parse_parameters(None)
    doc = read_json(body, "body")
    if not isinstance(doc, dict):
        raise HTTPError(400, f"JSON body must be an object with \"inputs\", not {type(doc).__name__}")
    unknown = sorted(set(doc) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise HTTPError(400, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(TOP_LEVEL_KEYS)}")
    inputs = doc.get("inputs")
    if not isinstance(inputs, str):
        raise HTTPError(400, '"inputs" must be a string: the image bytes, base64-encoded')
    if inputs.startswith(("http://", "https://")):
        raise HTTPError(400, '"inputs" is a URL; this server fetches nothing: send the image bytes base64-encoded')
    if inputs.startswith("data:") and "," in inputs:  # a data URL: data:image/png;base64,....
        inputs = inputs.split(",", 1)[1]
    try:
        image = base64.b64decode("".join(inputs.split()), validate=True)  # line breaks of `base64` allowed
    except (binascii.Error, ValueError) as e:
        raise HTTPError(400, f'"inputs" is not valid base64 ({e})') from e
    return image, parse_parameters(doc.get("parameters"))


def parse_form(body: bytes, content_type: str) -> tuple[bytes, dict]:
    """multipart/form-data: the one file part is the image; a "parameters" field, the JSON parameters."""
    try:
        parts = parse_multipart(body, content_type)
    except MultipartError as e:
        raise HTTPError(400, f"multipart/form-data body: {e}") from None
    files = [p for p in parts if p.filename is not None]
    fields = [p for p in parts if p.filename is None]
    if len(files) != 1:
        found = f"found {len(files)}" + (f" ({', '.join(p.name for p in files)})" if files else "")
        raise HTTPError(400, f"multipart/form-data body: expected one file part holding the image, {found}")
    names = [p.name for p in fields]
    unknown = sorted(set(names) - set(FORM_FIELDS))
    if unknown:
        raise HTTPError(400, f"multipart/form-data body: unknown field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(FORM_FIELDS)}, beside the file part")
    if len(names) != len(set(names)):
        raise HTTPError(400, "multipart/form-data body: the \"parameters\" field is given more than once")
    parameters = read_json(fields[0].data, 'form field "parameters"') if fields else None
    return files[0].data, parse_parameters(parameters)
