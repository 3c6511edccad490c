"""File formats of the command line: prompt files in, one JSON line per prompt out."""

from .console import Console
from .prompts_file import PromptFileError, PromptRecord, parse_shard, read_prompts, shard_records
from .results import ResultsFile

__all__ = ["Console", "PromptFileError", "PromptRecord", "parse_shard", "read_prompts", "shard_records", "ResultsFile"]
