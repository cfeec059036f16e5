"""The one exception type for mistakes a user can fix (bad path, bad config, ...).

The CLIs print it as a single line and exit with status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """An expected, user-fixable problem. The message says what is wrong and what to do."""
