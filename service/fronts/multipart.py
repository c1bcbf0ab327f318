"""multipart/form-data bodies parsed in one pass, in memory (python-multipart, the parser Starlette
uses, without its temp files), with every malformation a 400 in our shape.

Used by /classify to read its form, and by fronts/openapi.py to refuse malformed bodies before they
reach BentoML (whose multipart errors came out as 500s).
"""

from __future__ import annotations

from typing import NamedTuple

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.fronts.asgi import ServiceError


class Part(NamedTuple):
    name: str
    filename: str | None  # None: a text field
    content: bytes


# Parts one body may hold, counted as the parser meets them (before any part is kept or decoded): the
# largest form is /classify's 64 images plus its 3 fields; 16 spare for clients that repeat a field.
MAX_PARTS = 64 + 3 + 16


def text_instead_of_file(field: str, example: str) -> ServiceError:
    """A text value where a file belongs: 422. BentoML's `Path` inputs download such a value when it
    looks like a URL; the server reads images from the request only."""
    return ServiceError(422, f"{field} must be a file part (curl -F {field}=@{example}), not a text value: "
                             f"the server reads images from the request only, it fetches nothing a "
                             f"request names", "invalid_image")


def parts(content_type: bytes, data: bytes, max_parts: int = MAX_PARTS) -> list[Part]:
    """The body's parts, in order; 400 when it is not well-formed multipart with named parts, 413
    past `max_parts` (counted before anything is built, so a body of a million empty parts costs one
    parse)."""
    _, params = parse_options_header(content_type)
    if b"boundary" not in params:
        raise ServiceError(400, "multipart/form-data without a boundary parameter; let your HTTP client "
                                "build the body (curl -F image=@file.png)", "bad_request")
    return canonical(params[b"boundary"], data, max_parts) or parsed(params[b"boundary"], data, max_parts)


def canonical(boundary: bytes, data: bytes, max_parts: int) -> list[Part] | None:
    """The parts of a body exactly as HTTP clients write it (curl, requests, httpx, browsers, wrk's
    bodies here), cut with bytes.find; None for anything else, which `parsed` then reads (and refuses
    with its precise errors). Written by hand because python-multipart's per-byte callbacks cost
    22.6 µs of a LeNet request's ~275 µs of CPU for a one-image form, this 3 µs (BENCHMARKS.md,
    "The lean hot path"); it accepts only what that parser reads the same way
    (tests/test_multipart.py compares the two)."""
    delimiter = b"\r\n--" + boundary
    if not data.startswith(delimiter[2:] + b"\r\n") or data.count(delimiter) > max_parts:
        return None
    segments = (b"\r\n" + data).split(delimiter)  # ["", part, part, ..., "--\r\n"]
    if segments[0] or segments[-1] not in (b"--", b"--\r\n") or len(segments) < 3:
        return None
    out = []
    for segment in segments[1:-1]:
        head, sep, content = segment[2:].partition(b"\r\n\r\n")
        if not sep or not segment.startswith(b"\r\n"):
            return None
        disposition = None
        for line in head.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon or name != name.strip() or not name:
                return None
            if name.lower() == b"content-disposition":
                if disposition is not None:
                    return None
                disposition = value
        if disposition is None:
            return None
        kind, options = parse_options_header(disposition)
        name = options.get(b"name", b"").decode(errors="replace")
        if kind != b"form-data" or not name:
            return None
        filename = options.get(b"filename")
        out.append(Part(name, None if filename is None else filename.decode(errors="replace"), content))
    return out


def parsed(boundary: bytes, data: bytes, max_parts: int) -> list[Part]:
    """Any body python-multipart reads, with every malformation a 400."""
    raw: list[tuple[dict[bytes, bytes], bytearray, bytearray]] = []  # (headers, header name, data)

    def header_field(chunk: bytes, start: int, end: int) -> None:
        raw[-1][1].extend(chunk[start:end])

    def header_value(chunk: bytes, start: int, end: int) -> None:
        headers, name = raw[-1][0], bytes(raw[-1][1]).lower()
        headers[name] = headers.get(name, b"") + chunk[start:end]

    def header_end() -> None:
        raw[-1][1].clear()

    def part_data(chunk: bytes, start: int, end: int) -> None:
        raw[-1][2].extend(chunk[start:end])

    def part_begin() -> None:
        if len(raw) >= max_parts:
            raise ServiceError(413, f"more than {max_parts} parts in one multipart body; send at most "
                                    f"{max_parts} (files and fields together)", "too_many_parts")
        raw.append(({}, bytearray(), bytearray()))

    callbacks = {"on_part_begin": part_begin,
                 "on_header_field": header_field, "on_header_value": header_value,
                 "on_header_end": header_end, "on_part_data": part_data}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(data)
        parser.finalize()
    except MultipartParseError as e:
        raise ServiceError(400, f"malformed multipart body: {e}", "bad_request") from None
    out = []
    for headers, _, content in raw:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode(errors="replace")
        if not name:
            raise ServiceError(400, "malformed multipart body: a part without a Content-Disposition "
                                    "name", "bad_request")
        filename = disposition.get(b"filename")
        out.append(Part(name, None if filename is None else filename.decode(errors="replace"),
                        bytes(content)))
    return out
