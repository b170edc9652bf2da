"""``python -m trojscan.cli``."""

from trojscan.cli import main

main()
