"""One log line per event, `key=value` pairs, so saga ids can be grepped and parsed.

Values come from outside (ids and reasons from the bus, request data), so every key, value,
message and traceback is escaped: no value can end the line, forge a second one, or send a
terminal escape. A value with anything to escape is quoted; inside quotes `\\`, `"` and every
control, format, surrogate or line/paragraph separator character is written as an escape
(`\\n`, `\\r`, `\\t`, `\\xNN`, `\\uNNNN`, `\\UNNNNNNNN`), so `parse` gives back the exact text.
"""
import logging
import re
import time
import unicodedata

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# Cc: C0 and C1 controls (NUL, ESC, CR, NEL...); Cf: format characters (bidi overrides);
# Cs: lone surrogates, which the stream could not encode; Zl, Zp: U+2028, U+2029
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", '"': '\\"'}
_UNESCAPE = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"'}
_HEX_WIDTH = {"x": 2, "u": 4, "U": 8}


def _escape_char(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    if unicodedata.category(char) not in _UNSAFE_CATEGORIES:
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


# most values are plain printable ASCII: written as they are, or quoted as they are (with a space
# or an `=`), with no character-by-character escaping
_BARE = re.compile(r'[!#-<>-\[\]-~]+')
_QUOTED_AS_IS = re.compile(r'[ !#-\[\]-~]*')


def _quote(value) -> str:
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    if _QUOTED_AS_IS.fullmatch(text):
        return f'"{text}"'
    escaped = "".join(_escape_char(c) for c in text)
    if text == "" or escaped != text or any(c in text for c in " ="):
        return f'"{escaped}"'
    return text


def parse(line: str) -> dict[str, str]:
    """The pairs of one formatted line, unescaped (for tests and for tools reading the logs)."""
    fields, position = {}, 0
    while position < len(line):
        key, position = _token(line, position, stop="=")
        if line[position:position + 1] != "=":
            raise ValueError(f"expected '=' at {position} in {line!r}")
        value, position = _token(line, position + 1, stop=" ")
        fields[key] = value
        if position < len(line):
            if line[position] != " ":
                raise ValueError(f"expected ' ' at {position} in {line!r}")
            position += 1
    return fields


def _token(line: str, position: int, *, stop: str) -> tuple[str, int]:
    if line[position:position + 1] != '"':
        end = line.find(stop, position)
        end = len(line) if end < 0 else end
        return line[position:end], end
    out, position = [], position + 1
    while line[position] != '"':
        if line[position] != "\\":
            out.append(line[position])
            position += 1
            continue
        kind = line[position + 1]
        if kind in _HEX_WIDTH:
            width = _HEX_WIDTH[kind]
            out.append(chr(int(line[position + 2:position + 2 + width], 16)))
            position += 2 + width
        else:
            out.append(_UNESCAPE[kind])
            position += 2
    return "".join(out), position + 1


def _add(fields: dict, key: str, value) -> None:
    while key in fields:  # a second field of the same name keeps its value under a new name
        key += "_"
    fields[key] = value


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                _add(fields, key, value)
        if record.exc_info:
            _add(fields, "exc", self.formatException(record.exc_info))
        if record.stack_info:
            _add(fields, "stack", self.formatStack(record.stack_info))
        return " ".join(f"{_quote(key)}={_quote(value)}" for key, value in fields.items() if value is not None)
