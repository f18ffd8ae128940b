"""Errors a user can fix. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (params, data, files) and how to fix it, in one line."""


class ParamsError(UserError):
    """A key, type or value in params.yaml (or a --set override) is not allowed."""


class DataError(UserError):
    """An input file or row is missing or malformed."""


class MissingInputError(UserError):
    """A stage's input (an earlier stage's output) does not exist yet."""
