"""Errors a user can cause and fix. Caught at the edge (CLI, server, API) and shown as one line."""


class UserError(Exception):
    """A mistake the user can fix: the message is one sentence naming the file, flag or field
    and what to do. Tracebacks are for bugs, never for these."""
