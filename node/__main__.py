import sys

from kotta_executor.cli import main

sys.exit(main(["node", *sys.argv[1:]]))
