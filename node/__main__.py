import signal
import sys

# A stop request (SIGTERM, SIGINT, SIGHUP, SIGUSR1) that comes while Python imports the node waits, blocked,
# until the node has its handlers (kotta_executor.cli.cmd_node unblocks them), instead of
# killing it half-started.  (Blocked signals are inherited: they are unblocked before the
# node starts any process.)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                          signal.SIGUSR1})

from kotta_executor.cli import main  # noqa: E402

sys.exit(main(["node", *sys.argv[1:]]))
