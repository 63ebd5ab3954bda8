"""Errors a user can fix. Every entry point turns them into one paragraph and exit 2."""


class PipelineError(Exception):
    """An error the user can fix; its message is one paragraph that says what and how."""
