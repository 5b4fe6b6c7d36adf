"""A raw HTTP/2 client (cleartext, prior knowledge) that sends exactly the header fields it
is given — two ``:authority`` fields, ``host`` next to ``:authority``, repeated headers —
which no ordinary client does. Used by test_smuggling.

Header fields go out as HPACK literals without indexing (no Huffman coding); of the answer
only the ``:status`` is decoded. ``"reset"`` means Envoy refused the stream or the
connection instead of answering.
"""

from __future__ import annotations

import asyncio
import struct

Fields = list[tuple[str, str]]

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADERS, _RST_STREAM, _SETTINGS, _GOAWAY = 0x1, 0x3, 0x4, 0x7
_END_STREAM, _END_HEADERS, _PADDED, _PRIORITY, _ACK = 0x1, 0x4, 0x8, 0x20, 0x1
# HPACK static table entries 8-14: ":status" with these values.
_STATIC_STATUS = {8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500}
# HPACK Huffman codes of the digits, enough to read a Huffman-coded status.
_HUFFMAN_DIGITS = {
    "00000": "0", "00001": "1", "00010": "2", "011001": "3", "011010": "4",
    "011011": "5", "011100": "6", "011101": "7", "011110": "8", "011111": "9",
}  # fmt: skip


def _integer(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = [limit]
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
    return b"\x00" + _integer(len(raw_name), 7) + raw_name + _integer(len(raw_value), 7) + raw_value


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _status(block: bytes) -> int:
    first = block[0]
    if first & 0x80:  # indexed field
        return _STATIC_STATUS[first & 0x7F]
    # A literal whose name is static entry 8 (":status"), with or without indexing.
    assert (first & 0xC0 == 0x40 and first & 0x3F == 8) or (
        first & 0xF0 in (0, 0x10) and first & 0x0F == 8
    ), block
    length = block[1] & 0x7F
    data = block[2 : 2 + length]
    if not block[1] & 0x80:
        return int(data.decode())
    digits, code = "", ""
    for bit in "".join(f"{byte:08b}" for byte in data):
        code += bit
        if code in _HUFFMAN_DIGITS:
            digits, code = digits + _HUFFMAN_DIGITS[code], ""
            if len(digits) == 3:
                break
    return int(digits)


async def h2_request(host: str, port: int, fields: Fields, *, timeout: float = 5) -> int | str:
    """Send one request (``fields`` in order, no body); its status or ``"reset"``."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            block = b"".join(_literal(name, value) for name, value in fields)
            writer.write(
                _PREFACE
                + _frame(_SETTINGS, 0, 0, b"")
                + _frame(_HEADERS, _END_STREAM | _END_HEADERS, 1, block)
            )
            while True:
                head = await reader.readexactly(9)
                length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = await reader.readexactly(length)
                if kind == _SETTINGS and not flags & _ACK:
                    writer.write(_frame(_SETTINGS, _ACK, 0, b""))
                elif kind == _HEADERS and stream == 1:
                    if flags & _PADDED:
                        payload = payload[1 : len(payload) - payload[0]]
                    if flags & _PRIORITY:
                        payload = payload[5:]
                    return _status(payload)
                elif (kind == _RST_STREAM and stream == 1) or kind == _GOAWAY:
                    return "reset"
        except (asyncio.IncompleteReadError, ConnectionError):
            return "reset"
        finally:
            writer.transport.abort()
