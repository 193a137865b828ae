"""``lorakit <verb>``: argument parsing and printing only; every verb calls functions that tests
call directly.

Imports: anything below it; nothing imports it.
"""

from .main import main

__all__ = ["main"]
