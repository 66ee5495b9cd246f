"""A log record is one line, whatever text its fields hold, and that line parses back to the same text."""
import io
import logging
import sys
import unicodedata

from hypothesis import example, given, settings
from hypothesis import strategies as st

from orchestration_site.logfmt import _STANDARD, LogfmtFormatter, parse

FORMATTER = LogfmtFormatter()
UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}

# every code point, surrogates and controls included, weighted towards the ones that break lines
any_text = st.text(st.characters(codec=None, categories=None)) | st.text(
    st.sampled_from("\n\r\t\x00\x1b\x7f\x85\x9b\u2028\u2029\u202e\ufeff\ud800\\\"= ab"))
# extras named like a field of the line itself (or like its renamed copy) are kept under another
# name: test_an_extra_named_like_a_field_of_the_line_is_kept_beside_it shows that rule
LINE_FIELDS = {"ts", "level", "logger", "msg", "exc", "stack"}
extra_keys = st.text(min_size=1).filter(
    lambda k: k not in _STANDARD and not k.startswith("_") and k.rstrip("_") not in LINE_FIELDS)


def record(*, name: str, msg: str, extras: dict, exc_info=None) -> logging.LogRecord:
    made = logging.LogRecord(name, logging.WARNING, "saga.py", 1, msg, (), exc_info)
    made.__dict__.update(extras)
    return made


def exc_info_with(text: str):
    try:
        raise ValueError(text)
    except ValueError:
        return sys.exc_info()


def assert_one_safe_line(line: str) -> None:
    assert line.splitlines() == [line]
    assert not [c for c in line if unicodedata.category(c) in UNSAFE], line


@settings(max_examples=600)
@given(name=any_text, msg=any_text, extras=st.dictionaries(extra_keys, any_text, max_size=4),
       exception=st.none() | any_text)
@example(name="sagas.consumer", msg="reply\r\nts=now level=error msg=forged", extras={"saga_id": "\x1b[2J\x1b]0;pwned\x07"},
         exception="bad\u2028line")
def test_any_text_in_any_field_is_one_line_that_parses_back_to_the_same_values(name, msg, extras, exception):
    exc_info = exc_info_with(exception) if exception is not None else None
    line = FORMATTER.format(record(name=name, msg=msg, extras=extras, exc_info=exc_info))

    assert_one_safe_line(line)
    fields = parse(line)
    assert (fields["level"], fields["logger"], fields["msg"]) == ("warning", name, msg)
    assert {key: fields[key] for key in extras} == extras
    if exc_info:
        assert fields["exc"] == FORMATTER.formatException(exc_info)
        assert fields["exc"].endswith(f"ValueError: {exception}" if exception else "ValueError")


def test_an_extra_named_like_a_field_of_the_line_is_kept_beside_it():
    fields = parse(FORMATTER.format(record(name="sagas", msg="m", extras={"level": "forged", "msg": "x"})))
    assert (fields["level"], fields["level_"]) == ("warning", "forged")


def test_plain_values_stay_unquoted_for_grep():
    line = FORMATTER.format(record(name="sagas.consumer", msg="consuming", extras={"queue": "saga.replies", "prefetch": 50}))
    assert line.endswith(" level=warning logger=sagas.consumer msg=consuming queue=saga.replies prefetch=50")


def test_a_handler_writes_exactly_one_line_per_record():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(FORMATTER)
    logger = logging.getLogger("tests.logfmt")
    logger.addHandler(handler)
    try:
        logger.warning("reply for %s", "s-1\nlevel=info msg=forged", extra={"reason": "a\rb\x00c\x9bd"})
        try:
            raise RuntimeError("two\nlines")
        except RuntimeError:
            logger.exception("handler failed", stack_info=True)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 3
    assert parse(lines[0])["msg"] == "reply for s-1\nlevel=info msg=forged"
    assert parse(lines[0])["reason"] == "a\rb\x00c\x9bd"
    assert "RuntimeError: two\nlines" in parse(lines[1])["exc"] and "Stack (most recent call last)" in parse(lines[1])["stack"]
