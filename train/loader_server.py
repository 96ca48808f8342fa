"""Preloaded by the loader workers' fork server (see `train.data`), and by nothing else.

Importing it first ignores SIGINT in the fork server: a Ctrl-C reaches the whole process
group, and the server, still importing torch, would otherwise die of it with a traceback
(the server starts with SIGINT blocked, see `train.data`, so one that came earlier is
dropped here too).
The training process handles the Ctrl-C and shuts the workers down; each worker the server
forks then takes over the training process's own SIGINT handling (`train.data`).

Then it makes the fork server die with the training process that started it: the workers it
forks hold the server's liveness pipe, so without this a training process killed outright
would leave the server and its workers waiting on each other for good.
"""

from __future__ import annotations

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)  # before the heavy import below
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked at the server's start

from train.data import die_with_parent  # noqa: E402

die_with_parent()
