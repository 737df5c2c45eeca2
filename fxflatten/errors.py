"""The one exception users see.

Every failure that a user can fix (a wrong path, a model we cannot flatten, too little text)
raises :class:`FxflattenError` with a one-line message that says what went wrong and what to do.
The CLI prints that line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class FxflattenError(Exception):
    """A user-facing error whose message is one line saying what to do."""
