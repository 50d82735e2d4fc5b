"""python -m vmscope"""

from vmscope.cli.main import entry_point

entry_point()
