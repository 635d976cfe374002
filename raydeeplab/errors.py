"""The one base class for mistakes a user can fix; the CLI prints these without a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad flag, config, model name or dataset layout; the message names the culprit."""


def innermost(err: BaseException) -> BaseException:
    """The deepest exception a library chained under ``err`` (requests -> urllib3 -> socket):
    its message is usually the one that says what happened."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        nested = err.__cause__ or err.__context__
        if nested is None or not str(nested).strip():
            break
        err = nested
    return err


def cause_text(err: BaseException) -> str:
    """``Type: message`` of the innermost error on one line (Keras' messages span several), for
    the middle of a one-line message."""
    deepest = innermost(err)
    return f"{type(deepest).__name__}: {' '.join(str(deepest).split()) or type(err).__name__}"
