"""Errors a user can act on. Each carries one clear line that names what is wrong."""


class MoergeError(Exception):
    """Base of every error moerge reports to a user (CLI: one line, non-zero exit)."""


class RegistrationError(MoergeError):
    """A registration was refused; nothing was written."""


class NotFoundError(MoergeError):
    """A named expert, base model or artifact does not exist."""


class DefinitionError(MoergeError):
    """A strategy definition (or one of its parameters) was refused; nothing was stored."""
