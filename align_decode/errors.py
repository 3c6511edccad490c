"""Warnings of align-decode's own, told apart from those of the libraries it stands on.

The command line shows `AlignDecodeWarning`s always and library warnings only with --verbose.
"""


class AlignDecodeWarning(UserWarning):
    """Something about the user's run or setup that align-decode itself wants them to know."""
