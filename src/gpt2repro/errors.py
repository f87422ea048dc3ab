"""The one base class of every error a user can cause and fix (a bad config key, a missing file, a
full disk, another writer in the directory): the CLI prints any of them as one line and exits 2,
catching this class alone, so it needs none of their modules (nor torch) imported. Each layer
derives its own from it, keeping the built-in base its callers may catch."""


class UserError(Exception):
    """A one-line, user-facing error; the message names the problem and, where it can, the fix."""
