"""User-facing errors.

Anything a user can cause (a bad file, a bad flag, a plan that does not fit) raises
:class:`MoesimError` with a one-line message naming the problem and the fix. The CLI turns it into
``moesim: error: <message>`` and exit code 2. Internal invariants use ``assert``.
"""


class MoesimError(ValueError):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


class TraceError(MoesimError):
    """A routing trace that is malformed, corrupt or inconsistent with its metadata."""


class OutOfMemoryError(MoesimError):
    """A placement plan whose per-GPU memory exceeds the cluster's GPU memory."""
