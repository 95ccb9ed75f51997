"""``python -m loadtest``: see loadtest/run.py."""

from loadtest.run import main

main()
