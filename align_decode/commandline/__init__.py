"""The command line's plumbing: method and option declarations, config files, prompt files in, result
lines out, the console, and the jobs behind `align-decode run` and the training commands. `cli.py`
holds only the click commands. Nothing here imports torch at module level: `--help` and argument
errors stay instant."""
