"""The one exception type that carries a user-facing message.

Library code raises :class:`WsicellError` for bad input (a missing or unreadable file, a
store in the wrong state, ...) with a one-line message that names the file and the
problem; the command line prints that line and exits with :data:`EXIT_BAD_INPUT`.
"""

EXIT_BAD_INPUT = 2


class WsicellError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""
